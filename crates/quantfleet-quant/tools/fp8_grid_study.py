#!/usr/bin/env python3
"""Why do FP8 E4M3 weights miss the quality target on SmolLM2-135M, and what meets it? An independent study.

Quantizes the weight matrices of the model (the shipped GGUF dequantized to f32, as the engine's reference)
with several FP8 scale granularities and with INT8, in numpy + ml_dtypes (ml_dtypes' float8_e4m3fn cast is the
rounding oracle; values are clipped to +-448 first because that cast overflows to NaN; ml_dtypes' bfloat16 cast
rounds the matrices a variant keeps at bf16), runs the independent numpy forward pass of ../shared/oracle on the
oracle's prompts, and prints, per variant, the weight error (relative RMS over all matrices, the tied embedding
counted once) and the output divergence from the unquantized model (mean KL divergence and top-1 agreement over
every position). It shares no code with the Rust quantizer, so if its per-row FP8 figures match the engine's
`fp8` tier, the miss is the E4M3 grid, not an implementation bug.

Three groups of variants:
- granularity: every matrix in one scheme (the engine's fp8 and int8 tiers, and FP8 scale layouts it lacks);
- where the miss comes from: FP8 per-row on one kind of matrix only, the rest left f32 (the tied embedding
  as a whole, only its lookup side, only its lm_head side, attention q/k/v/o, FFN gate/up/down, the first and
  last layer);
- FP8 per-row tiers the engine can serve with `layerOverrides` (bf16 embedding/lm_head, bf16 first/last layer),
  and the same bf16 embedding/lm_head under FP8 g32 (not servable) and INT8, for comparison.

    ~/.cache/quantfleet/venv-quant/bin/python crates/quantfleet-quant/tools/fp8_grid_study.py \
        "$(scripts/fetch-model.sh)" [--oracle ../shared/oracle] [--max-tokens 96] [--only SUBSTRING ...]

Requires numpy, ml_dtypes==0.6.0 and gguf==0.19.0 (venv: `python3 -m venv ~/.cache/quantfleet/venv-quant &&
~/.cache/quantfleet/venv-quant/bin/pip install ml-dtypes==0.6.0 numpy gguf==0.19.0`). One variant is one oracle
forward pass over the prompts: about a minute on a loaded 2-core machine, all 20 variants about 25 minutes.
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


def bf16(w):
    """Round-to-nearest-even bf16, as the engine stores a bf16 matrix."""
    return w.astype(ml_dtypes.bfloat16).astype(np.float32)


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


EMBEDDING = "token_embd.weight"  # tied: the token lookup and the lm_head
ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_output")
FFN = ("ffn_gate", "ffn_up", "ffn_down")


def layer_of(name):
    """blk.L.KIND.weight -> L; None for the embedding."""
    return int(name.split(".")[1]) if name.startswith("blk.") else None


def kind_of(name):
    """blk.L.KIND.weight -> KIND; None for the embedding."""
    return name.split(".")[2] if name.startswith("blk.") else None


def everywhere(quant):
    return lambda name, n_layer: quant


def only(pred, quant=fp8_per_row):
    """`quant` on the matrices `pred` selects, the rest left f32 (None)."""
    return lambda name, n_layer: quant if pred(name, n_layer) else None


def kept_bf16(pred, quant=fp8_per_row):
    """bf16 on the matrices `pred` selects (a tier's layerOverrides), `quant` on the rest."""
    return lambda name, n_layer: bf16 if pred(name, n_layer) else quant


def is_embedding(name, n_layer):
    return name == EMBEDDING


def is_edge_layer(name, n_layer):
    return layer_of(name) in (0, n_layer - 1)


# (name, policy, side): policy(matrix name, layer count) -> quantizer or None (keep f32). `side` applies the
# tied embedding's quantized copy to its lookup ("in") or its lm_head ("out") use only; None: both, as stored.
VARIANTS = [
    ("fp8 per-tensor", everywhere(fp8_per_tensor), None),
    ("fp8 per-row (the engine's fp8 tier)", everywhere(fp8_per_row), None),
    ("fp8 per-row, MSE-clipped scale", everywhere(fp8_per_row_mse), None),
    ("fp8 per-group 128", everywhere(lambda w: fp8_per_group(w, 128)), None),
    ("fp8 per-group 32", everywhere(lambda w: fp8_per_group(w, 32)), None),
    ("int8 per-row (the engine's int8 tier)", everywhere(int8_per_row), None),
    ("bf16 everywhere (the engine's bf16 tier)", everywhere(bf16), None),
    ("fp8 per-row on the embedding only", only(is_embedding), None),
    ("  ... its token lookup only", only(is_embedding), "in"),
    ("  ... its lm_head use only", only(is_embedding), "out"),
    ("fp8 per-row on attention q/k/v/o only", only(lambda n, _: kind_of(n) in ATTENTION), None),
    ("fp8 per-row on FFN gate/up/down only", only(lambda n, _: kind_of(n) in FFN), None),
    ("fp8 per-row on first+last layer only", only(is_edge_layer), None),
    ("  ... first layer only", only(lambda n, _: layer_of(n) == 0), None),
    ("  ... last layer only", only(lambda n, l: layer_of(n) == l - 1), None),
    ("fp8 per-row, embedding/lm_head bf16", kept_bf16(is_embedding), None),
    ("fp8 per-row, first+last layer bf16", kept_bf16(is_edge_layer), None),
    ("fp8 per-row, embd/lm_head+first/last bf16", kept_bf16(lambda n, l: is_embedding(n, l) or is_edge_layer(n, l)),
     None),
    # Not servable by the engine (no FP8 group scales) or other formats with the same override, for comparison.
    ("fp8 per-group 32, embedding/lm_head bf16", kept_bf16(is_embedding, lambda w: fp8_per_group(w, 32)), None),
    ("int8 per-row, embedding/lm_head bf16", kept_bf16(is_embedding, int8_per_row), None),
]


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--oracle", default=os.path.join(os.path.dirname(__file__), "../../../../shared/oracle"))
    ap.add_argument("--max-tokens", type=int, default=96, help="longest prompt prefix used")
    ap.add_argument("--only", nargs="*", default=[], help="run only variants whose name contains one of these")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.oracle, "reference_forward.py")):
        sys.exit(f"no oracle at {os.path.abspath(args.oracle)}: pass --oracle (the shared/oracle directory)")
    sys.path.insert(0, os.path.abspath(args.oracle))
    from reference_forward import Llama  # the independent oracle forward pass

    t0 = time.time()
    model = Llama(args.model)
    if "output.weight" in model.W:
        sys.exit("this study assumes a tied embedding (no output.weight), as SmolLM2-135M has")
    cases = json.load(open(os.path.join(args.oracle, "reference_logits.json")))
    prompts = [c["ids"][: args.max_tokens] for c in cases]
    ref = [log_softmax(model.logits(ids).astype(np.float64)) for ids in prompts]
    n_pos = sum(len(p) for p in prompts)
    print(f"SmolLM2-135M, {len(prompts)} oracle prompts, {n_pos} positions (prefixes of <= {args.max_tokens} tokens)")
    names = [n for n in model.W if model.W[n].ndim == 2]
    original = {n: model.W[n] for n in names}
    total = sum(original[n].size for n in names)
    den = sum(float((original[n].astype(np.float64) ** 2).sum()) for n in names)
    print(f"{len(names)} weight matrices, {total / 1e6:.1f}M weights (the tied embedding is also the output)\n")
    print(f"{'VARIANT':<44} {'WEIGHT REL RMS':>14} {'MEAN KLD':>9} {'TOP-1':>7}")
    for name, policy, side in VARIANTS:
        if args.only and not any(o in name for o in args.only):
            continue
        num = 0.0
        for n in names:
            quant = policy(n, model.n_layer)
            if quant is None:
                continue
            w = original[n]
            q = quant(w).astype(np.float32)
            num += float(((q - w) ** 2).sum())
            model.W[n] = q
        # The engine stores one tied matrix for both uses; `side` splits them only to attribute the error.
        model.out_w = model.W[EMBEDDING]
        if side == "in":
            model.out_w = original[EMBEDDING]
        elif side == "out":
            model.W[EMBEDDING] = original[EMBEDDING]
        kld = agree = 0.0
        for ids, lr in zip(prompts, ref):
            lq = log_softmax(model.logits(ids).astype(np.float64))
            kld += float((np.exp(lr) * (lr - lq)).sum(-1).sum())
            agree += float((lr.argmax(-1) == lq.argmax(-1)).sum())
        print(f"{name:<44} {np.sqrt(num / den):>14.5f} {kld / n_pos:>9.5f} {100 * agree / n_pos:>6.1f}%", flush=True)
        model.W.update(original)
    model.out_w = model.W[EMBEDDING]
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
