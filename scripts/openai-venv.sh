#!/usr/bin/env bash
# Installs the official OpenAI Python client (PyPI `openai`, pinned) into a venv in the Quantfleet cache, once,
# and prints the venv's python on stdout. The router's streaming test drives the router with it
# (QUANTFLEET_OPENAI_PYTHON, exported by scripts/test.sh).
set -euo pipefail

readonly OPENAI_SPEC="openai==3.54.0"

cache="${QUANTFLEET_CACHE:-$HOME/.cache/quantfleet}"
venv="$cache/venv-openai"
stamp="$venv/.installed-$OPENAI_SPEC"
if [[ ! -f "$stamp" ]]; then
    printf 'openai-venv: installing %s into %s\n' "$OPENAI_SPEC" "$venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$OPENAI_SPEC" >&2
    touch "$stamp"
fi
printf '%s\n' "$venv/bin/python"
