#!/usr/bin/env bash
# Installs numpy and the `gguf` package (llama.cpp's GGUF reader, PyPI, pinned) into a venv in the Quantfleet
# cache, once, and prints the venv's python on stdout. The engine's safetensors test converts the real GGUF
# into a Hugging Face directory with it (crates/quantfleet-engine/tools/gguf_to_hf.py; QUANTFLEET_GGUF_PYTHON,
# exported by scripts/test.sh).
set -euo pipefail

readonly SPECS=("numpy==2.3.5" "gguf==0.19.0")

cache="${QUANTFLEET_CACHE:-$HOME/.cache/quantfleet}"
venv="$cache/venv-gguf"
stamp="$venv/.installed-$(IFS=-; echo "${SPECS[*]}")"
if [[ ! -f "$stamp" ]]; then
    printf 'gguf-venv: installing %s into %s\n' "${SPECS[*]}" "$venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${SPECS[@]}" >&2
    touch "$stamp"
fi
printf '%s\n' "$venv/bin/python"
