#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-batched-bench and llama-quantize (CPU only) once, from the sources vendored in the PyPI
# `llama-cpp-python==0.3.36` sdist, with cmake and ninja from PyPI, and caches the binaries under
# $QUANTFLEET_CACHE/llama.cpp. Prints the directory holding the binaries on stdout (progress on stderr).
# llama.cpp is the CPU peer of scripts/bench-engine.sh; nothing else uses it. Idempotent: a re-run only prints.
# The cold build takes ~10-15 min on 2 cores; it runs under `nice -n 10` so it shares the machine politely.
#
#   scripts/build-llama-cpp.sh            # GGML_NATIVE: every instruction set this CPU has
#   scripts/build-llama-cpp.sh --avx2     # AVX2/FMA/F16C only (no AVX-512), the peer of QUANTFLEET_CPU_ISA=avx2
set -euo pipefail

variant=native
case "${1:-}" in
    "") ;;
    --avx2) variant=avx2 ;;
    *) echo "build-llama-cpp: unknown option ${1}; use --avx2 or nothing" >&2; exit 2 ;;
esac

readonly SDIST_SPEC="llama-cpp-python==0.3.36"
readonly SDIST_NAME="llama_cpp_python-0.3.36.tar.gz"
readonly TOOLS=(llama-bench llama-batched-bench llama-quantize)
readonly BUILD_TOOLS=("cmake==4.4.4" "ninja==1.13.2" "scikit-build-core==1.1.2")

cache="${QUANTFLEET_CACHE:-$HOME/.cache/quantfleet}"
root="$cache/llama.cpp"
if [[ "$variant" == native ]]; then bin="$root/bin" build="$root/build" isa_flags=(-DGGML_NATIVE=ON)
# Without GGML_NATIVE, ggml enables AVX, AVX2, BMI2, FMA and F16C and leaves every AVX-512 option off.
else bin="$root/bin-avx2" build="$root/build-avx2" isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF); fi
venv="$cache/venv-llama-build"

log() { printf 'build-llama-cpp: %s\n' "$*" >&2; }

complete=1
for t in "${TOOLS[@]}"; do [[ -x "$bin/$t" ]] || complete=0; done
if [[ "$complete" == 1 && -f "$bin/.complete" ]]; then
    printf '%s\n' "$bin"
    exit 0
fi

mkdir -p "$root"
if [[ ! -x "$venv/bin/cmake" || ! -x "$venv/bin/ninja" ]]; then
    log "creating the build-tool venv $venv (cmake, ninja from PyPI)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "${BUILD_TOOLS[@]}" >&2
fi

sdist="$root/$SDIST_NAME"
if [[ ! -f "$sdist" ]]; then
    log "downloading the $SDIST_SPEC sdist (sources only, not built)"
    # --no-build-isolation with the build tools present keeps pip from building the package to read its metadata.
    PATH="$venv/bin:$PATH" "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
        --no-binary :all: --no-build-isolation -d "$root" "$SDIST_SPEC" >&2
fi

src="$root/src"
if [[ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]]; then
    log "extracting $SDIST_NAME"
    rm -rf "$src" && mkdir -p "$src"
    tar -xzf "$sdist" -C "$src" --strip-components=1
fi

start=$(date +%s)
log "configuring and building ${TOOLS[*]} (CPU, ${isa_flags[*]}) in $build"
nice -n 10 "$venv/bin/cmake" -S "$src/vendor/llama.cpp" -B "$build" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release "${isa_flags[@]}" -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON >&2
nice -n 10 "$venv/bin/cmake" --build "$build" -j2 --target "${TOOLS[@]}" >&2

mkdir -p "$bin"
for t in "${TOOLS[@]}"; do cp -f "$build/bin/$t" "$bin/"; done
touch "$bin/.complete"
log "built in $(($(date +%s) - start)) s"
printf '%s\n' "$bin"
