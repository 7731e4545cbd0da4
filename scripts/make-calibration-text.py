#!/usr/bin/env python3
"""Regenerates crates/quantfleet-engine/calibration/calibration.txt, the built-in calibration text of AWQ,
GPTQ and SmoothQuant tiers (`calibration.dataset: builtin`).

The text mixes the task classes the router serves, so the activations a calibrated tier is fitted on look like
its traffic: chat turns (TruthfulQA questions with their correct answer), math (GSM8K problems with their
worked solutions), code (HumanEval prompts with their canonical solutions), function calls (BFCL tool schemas
and requests) and prose (the Julius Caesar oration of the original built-in text, public domain). Items are
interleaved one per class in turn, so any prefix of the text is a mix.

It takes the LAST items of each data set: `quantfleet eval` reads the first `--samples` items (at most
EVAL_MAX_SAMPLES = 64), so calibration text and evaluation prompts never overlap. Input: the data directory of
`scripts/fetch-eval-data.sh`. Licenses: TruthfulQA and BFCL Apache-2.0, GSM8K and HumanEval MIT (see
calibration/README.md).

    python3 scripts/make-calibration-text.py "$(scripts/fetch-eval-data.sh)"
"""
import json, os, sys

EVAL_MAX_SAMPLES = 64
TAKE = {"chat": 24, "math": 16, "code": 12, "json": 16}
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "../crates/quantfleet-engine/calibration/calibration.txt")
PROSE = os.path.join(HERE, "../crates/quantfleet-engine/calibration/julius_caesar_iii_ii.txt")


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def turn(role, text):
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def last(items, n, cls):
    if len(items) - n < EVAL_MAX_SAMPLES:
        sys.exit(f"{cls}: {len(items)} items; taking the last {n} would overlap eval's first {EVAL_MAX_SAMPLES}")
    return items[-n:]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = sys.argv[1]
    chat = [turn("user", q["question"]) + turn("assistant", q["choices"][q["expected_index"]])
            for q in last(jsonl(os.path.join(d, "truthfulqa.jsonl")), TAKE["chat"], "chat")]
    math = [turn("user", p["prompt"]) + turn("assistant", p["upstream_answer"])
            for p in last(jsonl(os.path.join(d, "gsm8k.jsonl")), TAKE["math"], "math")]
    code = [p["prompt"] + p["canonical_solution"]
            for p in last(jsonl(os.path.join(d, "humaneval.jsonl")), TAKE["code"], "code")]
    calls = [turn("system", "You call functions. Reply with one JSON object {\"name\": ..., \"arguments\": {...}}. "
                  "Functions: " + json.dumps(c["function"]))
             + turn("user", c["question"][0][0]["content"])
             for c in last(jsonl(os.path.join(d, "bfcl_simple_python.json")), TAKE["json"], "json")]
    with open(PROSE) as f:
        prose = [p.strip() + "\n" for p in f.read().split("\n\n") if p.strip()]
    classes = [chat, math, code, calls, prose]
    parts = []
    for i in range(max(len(c) for c in classes)):
        parts.extend(c[i] for c in classes if i < len(c))
    text = "\n".join(parts)
    with open(OUT, "w") as f:
        f.write(text)
    print(f"{os.path.relpath(OUT)}: {len(text)} bytes, {sum(len(c) for c in classes)} items", file=sys.stderr)


if __name__ == "__main__":
    main()
