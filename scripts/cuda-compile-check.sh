#!/usr/bin/env bash
# NVRTC compile check of every CUDA kernel for sm_80, sm_89 and sm_90, with a registers/spills/smem report.
# No GPU or CUDA toolkit needed: libnvrtc comes from NVIDIA's PyPI wheel, installed once into a venv under
# $QUANTFLEET_CACHE/cuda and reused. Also lints the `cuda` feature (off in the default workspace build) of
# quantfleet-kernels, the engine's CUDA backend, the node and the CLI, with no driver installed. Fails when a kernel does not compile or spills unjustified.
# Usage: scripts/cuda-compile-check.sh [sm_80,sm_89,sm_90]
set -euo pipefail
cd "$(dirname "$0")/.."

NVRTC_WHEEL="nvidia-cuda-nvrtc==13.5.37"  # 13.x: must match cudarc's cuda-13040 feature (root Cargo.toml)
PYTHON="$(scripts/venv.sh cuda/venv "$NVRTC_WHEEL")"
NVRTC_LIB="$("$PYTHON" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')"
[ -e "$NVRTC_LIB/libnvrtc.so.13" ] || { echo "libnvrtc.so.13 not found in $NVRTC_LIB" >&2; exit 1; }

cargo clippy --locked -p quantfleet-kernels -p quantfleet-engine -p quantfleet-node -p quantfleet --features cuda \
    --all-targets -- -D warnings
cargo build --locked -p quantfleet-kernels --features cuda --bin quantfleet-kernel-check
BIN="${CARGO_TARGET_DIR:-target}/debug/quantfleet-kernel-check"
export LD_LIBRARY_PATH="$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# NVRTC compiles one program at a time within a process, so each architecture gets its own process; the
# reports are printed in order once all have finished, and any failure fails the check.
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
IFS=, read -r -a archs <<< "${1:-sm_80,sm_89,sm_90}"
pids=()
for arch in "${archs[@]}"; do
    "$BIN" "$arch" > "$out/$arch.log" 2>&1 &
    pids+=("$!")
done
status=0
for i in "${!archs[@]}"; do
    wait "${pids[$i]}" || status=1
    cat "$out/${archs[$i]}.log"
done
exit "$status"
