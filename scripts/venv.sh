#!/usr/bin/env bash
# Installs pinned PyPI packages into a venv in the Quantfleet cache, once, and prints the venv's python on
# stdout. A venv is rebuilt when its pins change (the stamp file names them).
#
#   scripts/venv.sh DIR SPEC...     e.g. scripts/venv.sh venv-openai openai==3.54.0
#
# DIR is relative to $QUANTFLEET_CACHE (default ~/.cache/quantfleet). scripts/test.sh pins and exports the
# test suite's interpreters with it.
set -euo pipefail

[[ $# -ge 2 ]] || { echo "usage: scripts/venv.sh DIR SPEC..." >&2; exit 2; }
cache="${QUANTFLEET_CACHE:-$HOME/.cache/quantfleet}"
venv="$cache/$1"
shift
stamp="$venv/.installed-$(IFS=-; echo "$*")"
if [[ ! -f "$stamp" ]]; then
    printf 'venv: installing %s into %s\n' "$*" "$venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2
    touch "$stamp"
fi
printf '%s\n' "$venv/bin/python"
