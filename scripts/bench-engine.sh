#!/usr/bin/env bash
# The CPU engine benchmark (issue 4): Quantfleet at every weight tier against llama.cpp on the same GGUF at
# comparable bits, in one run on this machine. Prints prefill and decode tokens/s at batch 1 and batch 8, the
# ratios, the fraction of the memory-bandwidth roofline reached at batch-1 decode (read bandwidth measured in
# the same run) and the resident memory of each tier next to the fit planner's figures.
# Not part of scripts/test.sh (it takes several minutes); README.md ("Engine speed") shows a measured run.
#
#   scripts/bench-engine.sh [tier_bench options: --prompt 128 --gen 64 --batch 8 --reps 3 --threads 2 --tier NAME]
#   QUANTFLEET_CPU_ISA=avx2 scripts/bench-engine.sh    # an AVX2-only machine: both engines without AVX-512
#
# llama.cpp is built once from the PyPI llama-cpp-python sdist (scripts/build-llama-cpp.sh, ~15 min cold on an idle machine);
# its requantized GGUFs are cached in $QUANTFLEET_CACHE/bench-gguf.
set -euo pipefail
cd "$(dirname "$0")/.."

export QUANTFLEET_CACHE="${QUANTFLEET_CACHE:-$HOME/.cache/quantfleet}"
model="$(scripts/fetch-model.sh)"
case "${QUANTFLEET_CPU_ISA:-}" in
    "" | avx512) llama_bin="$(scripts/build-llama-cpp.sh)" ;;
    avx2) llama_bin="$(scripts/build-llama-cpp.sh --avx2)" ;;  # our kernels capped at AVX2, llama.cpp built for it
    *) echo "bench-engine: QUANTFLEET_CPU_ISA=${QUANTFLEET_CPU_ISA} has no llama.cpp peer (avx512 or avx2)" >&2; exit 2 ;;
esac
cargo build --release --locked -p quantfleet-engine --example tier_bench >&2
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/examples/tier_bench" --model "$model" --llama-bin "$llama_bin" \
    --work "$QUANTFLEET_CACHE/bench-gguf" --threads "${BENCH_THREADS:-$(nproc)}" "$@"
