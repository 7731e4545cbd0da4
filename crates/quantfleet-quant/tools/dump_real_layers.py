#!/usr/bin/env python3
"""Dump real SmolLM2-135M linear weights and their real input activations for quantfleet-quant's real-layer run.

The activations come from the project's independent numpy reference forward pass (shared/oracle, which
dequantizes the GGUF with the `gguf` package) over the token ids of its 9 reference prompts (chat, code, math,
JSON, Unicode, a 635-token Shakespeare passage). Nothing here shares code with the Rust engine.

    ~/.cache/quantfleet/venv-quant/bin/pip install ml-dtypes==0.6.0 numpy gguf==0.19.0
    ~/.cache/quantfleet/venv-quant/bin/python crates/quantfleet-quant/tools/dump_real_layers.py \
        [--model GGUF] [--oracle DIR] [--blocks 0,15,29] [--out DIR]
    cargo run --release -p quantfleet-quant --example real_layers -- DIR

Output (DIR defaults to $QUANTFLEET_CACHE/real-layers): for every captured linear `blk.B.NAME`,
`blk.B.NAME.weight.f32` ([out x in], row-major little-endian f32, dequantized from Q4_1) and
`blk.B.NAME.input.f32` ([tokens x in], the activations that multiplied it), plus manifest.txt: one
"segment NAME TOKENS" line per prompt in token order, then one "layer NAME OUT IN TOKENS" line per linear.
"""
import argparse
import json
import os
import pathlib
import sys

import numpy as np

LINEARS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


class Capture:
    """Stands in for a weight matrix W; `h @ W.T` records h and returns the real product."""

    __array_ufunc__ = None  # make numpy defer `ndarray @ Capture.T` to our __rmatmul__

    def __init__(self, w, sink):
        self.w, self.sink = w, sink

    @property
    def T(self):
        return self

    def __rmatmul__(self, h):
        self.sink.append(np.array(h, dtype=np.float32))
        return h @ self.w.T


def main():
    repo = pathlib.Path(__file__).resolve().parents[3]
    cache = pathlib.Path(os.environ.get("QUANTFLEET_CACHE", pathlib.Path.home() / ".cache/quantfleet"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(cache / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--oracle", default=str(repo.parent / "shared/oracle"))
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--out", default=str(cache / "real-layers"))
    a = ap.parse_args()
    sys.path.insert(0, a.oracle)
    from reference_forward import Llama  # the shared independent oracle

    m = Llama(a.model)
    cases = json.load(open(pathlib.Path(a.oracle) / "reference_logits.json"))
    blocks = [int(b) for b in a.blocks.split(",")]
    sinks = {}
    for b in blocks:
        for name in LINEARS:
            key = f"blk.{b}.{name}.weight"
            sinks[key] = []
            m.W[key] = Capture(m.W[key], sinks[key])
    segments = []
    for c in cases:
        m.logits(c["ids"])
        segments.append({"name": c["name"], "tokens": len(c["ids"])})
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    layers = []
    for key, chunks in sinks.items():
        base = key[: -len(".weight")]
        w = np.ascontiguousarray(m.W[key].w, dtype=np.float32)
        x = np.ascontiguousarray(np.concatenate(chunks, axis=0), dtype=np.float32)
        w.astype("<f4").tofile(out / f"{base}.weight.f32")
        x.astype("<f4").tofile(out / f"{base}.input.f32")
        layers.append({"name": base, "out": w.shape[0], "in": w.shape[1], "tokens": x.shape[0]})
    lines = [f"# {os.path.basename(a.model)} via shared/oracle reference_forward.py"]
    lines += [f"segment {s['name']} {s['tokens']}" for s in segments]
    lines += [f"layer {l['name']} {l['out']} {l['in']} {l['tokens']}" for l in layers]
    (out / "manifest.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(layers)} layers, {sum(s['tokens'] for s in segments)} tokens to {out}")


if __name__ == "__main__":
    main()
