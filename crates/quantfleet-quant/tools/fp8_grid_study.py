#!/usr/bin/env python3
"""Why do FP8 E4M3 weights miss the quality target on SmolLM2-135M? An independent study.

Quantizes every weight matrix of the model (the shipped GGUF dequantized to f32, as the engine's reference)
with several FP8 scale granularities and with INT8, in numpy + ml_dtypes (ml_dtypes' float8_e4m3fn cast is the
rounding oracle; values are clipped to +-448 first because that cast overflows to NaN), runs the independent
numpy forward pass of ../shared/oracle on the oracle's prompts, and prints, per variant, the weight error
(relative RMS over all matrices) and the output divergence from the unquantized model (mean KL divergence and
top-1 agreement over every position). It shares no code with the Rust quantizer, so if its per-row FP8 figures
match the engine's `fp8` tier, the miss is the E4M3 grid, not an implementation bug.

    ~/.cache/quantfleet/venv-quant/bin/python crates/quantfleet-quant/tools/fp8_grid_study.py \
        "$(scripts/fetch-model.sh)" [--oracle ../shared/oracle] [--max-tokens 160]

Requires numpy, ml_dtypes==0.6.0 and gguf (the venv of scripts/... that the quant tests use).
"""
import argparse, json, os, sys, time

import ml_dtypes
import numpy as np

E4M3 = ml_dtypes.float8_e4m3fn
E4M3_MAX = 448.0


def fp8(w, scale):
    """E4M3 quantize-dequantize with the given (broadcastable) scale; scale 0 rows stay 0."""
    s = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(w / s, -E4M3_MAX, E4M3_MAX).astype(E4M3).astype(np.float32)
    return q * s


def fp8_per_tensor(w):
    return fp8(w, np.float32(np.abs(w).max() / E4M3_MAX))


def fp8_per_row(w):
    return fp8(w, np.abs(w).max(1, keepdims=True) / E4M3_MAX)


def fp8_per_group(w, g):
    rows, cols = w.shape
    pad = (-cols) % g
    wp = np.pad(w, ((0, 0), (0, pad))).reshape(rows, -1, g)
    out = fp8(wp, np.abs(wp).max(2, keepdims=True) / E4M3_MAX)
    return out.reshape(rows, -1)[:, :cols]


def fp8_per_row_mse(w, grid=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5)):
    """Per row, the amax fraction (clipping) that minimizes the squared error."""
    base = np.abs(w).max(1, keepdims=True) / E4M3_MAX
    best, best_err = None, None
    for f in grid:
        q = fp8(w, base * f)
        err = ((q - w) ** 2).sum(1, keepdims=True)
        if best is None:
            best, best_err = q, err
        else:
            take = err < best_err
            best = np.where(take, q, best)
            best_err = np.minimum(err, best_err)
    return best


def int8_per_row(w):
    s = np.abs(w).max(1, keepdims=True) / 127.0
    s = np.where(s > 0, s, 1.0)
    return np.clip(np.rint(w / s), -127, 127) * s


VARIANTS = [
    ("fp8 per-tensor", fp8_per_tensor),
    ("fp8 per-row (the engine's fp8 tier)", fp8_per_row),
    ("fp8 per-row, MSE-clipped scale", fp8_per_row_mse),
    ("fp8 per-group 128", lambda w: fp8_per_group(w, 128)),
    ("fp8 per-group 32", lambda w: fp8_per_group(w, 32)),
    ("int8 per-row (the engine's int8 tier)", int8_per_row),
]


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--oracle", default=os.path.join(os.path.dirname(__file__), "../../../../shared/oracle"))
    ap.add_argument("--max-tokens", type=int, default=160, help="longest prompt prefix used")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.oracle))
    from reference_forward import Llama  # the independent oracle forward pass

    t0 = time.time()
    model = Llama(args.model)
    cases = json.load(open(os.path.join(args.oracle, "reference_logits.json")))
    prompts = [c["ids"][: args.max_tokens] for c in cases]
    ref = [log_softmax(model.logits(ids).astype(np.float64)) for ids in prompts]
    n_pos = sum(len(p) for p in prompts)
    print(f"SmolLM2-135M, {len(prompts)} oracle prompts, {n_pos} positions (prefixes of <= {args.max_tokens} tokens)")
    names = [n for n in model.W if model.W[n].ndim == 2]
    original = {n: model.W[n] for n in names}
    total = sum(original[n].size for n in names)
    print(f"{len(names)} weight matrices, {total / 1e6:.1f}M weights (the tied embedding is also the output)\n")
    print(f"{'VARIANT':<40} {'WEIGHT REL RMS':>14} {'MEAN KLD':>9} {'TOP-1':>7}")
    for name, quant in VARIANTS:
        num = den = 0.0
        for n in names:
            w = original[n]
            q = quant(w).astype(np.float32)
            num += float(((q - w) ** 2).sum())
            den += float((w.astype(np.float64) ** 2).sum())
            model.W[n] = q
        model.out_w = model.W.get("output.weight", model.W["token_embd.weight"])
        kld = agree = 0.0
        for ids, lr in zip(prompts, ref):
            lq = log_softmax(model.logits(ids).astype(np.float64))
            kld += float((np.exp(lr) * (lr - lq)).sum(-1).sum())
            agree += float((lr.argmax(-1) == lq.argmax(-1)).sum())
        print(f"{name:<40} {np.sqrt(num / den):>14.5f} {kld / n_pos:>9.5f} {100 * agree / n_pos:>6.1f}%")
        model.W.update(original)
    model.out_w = model.W.get("output.weight", model.W["token_embd.weight"])
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
