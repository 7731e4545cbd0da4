#!/usr/bin/env python3
"""Convert a llama GGUF (the real SmolLM2-135M test model) into a Hugging Face checkpoint directory, for the
engine's safetensors test (tests/safetensors_real.rs), which loads both and compares them.

Independent of the Rust engine: tensors are read and dequantized with the `gguf` package, the safetensors
files are written here with numpy bytes and a JSON header, and tokenizer.json is assembled from the GGUF's
vocabulary in the `tokenizers` JSON format that SmolLM2's own Hugging Face release uses.

    python3 tools/gguf_to_hf.py --model SmolLM2-135M-Instruct.Q4_1.gguf --out DIR [--shards 2]

Output (written to DIR.tmp, then renamed, so DIR is always complete):
  config.json                 LlamaForCausalLM config from the llama.* metadata
  model-0000k-of-0000N.safetensors + model.safetensors.index.json   (--shards N > 1; default 2)
  model.safetensors           (--shards 1)
  tokenizer.json, tokenizer_config.json

Weights are dequantized to float32 (exact for Q4_1/Q8_0: each value is a float32 product of a float16 scale and a
small integer, plus a float16 offset). q_proj/k_proj rows are put back into the Hugging Face "rotate-half" RoPE
layout: GGUF keeps the two elements a rotation mixes next to each other (rows 2i and 2i+1 of a head), HF keeps
them half a head apart (rows i and i + head_dim/2); so HF row j*head_dim/2 + i is GGUF row 2i + j.

Requires numpy and gguf==0.19.0 (scripts/test.sh installs them with scripts/venv.sh).
"""
import argparse
import json
import os
import pathlib
import shutil
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOKEN_TYPE_CONTROL = 3


def hf_name(gguf_name):
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    blk, layer, what, suffix = gguf_name.split(".")
    assert blk == "blk" and suffix == "weight", gguf_name
    return f"model.layers.{int(layer)}.{LAYER_NAMES[what]}.weight"


def to_rotate_half(w, n_heads):
    """GGUF adjacent-pair rows -> HF rotate-half rows, head by head (w is [n_heads * head_dim, cols])."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    assert head_dim * n_heads == rows and head_dim % 2 == 0
    # Index GGUF rows of a head as (i, j) with row = 2i + j; HF wants them ordered (j, i), row = j*half + i.
    return w.reshape(n_heads, head_dim // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def write_safetensors(path, tensors):
    """tensors: list of (name, float32 array). Header padded with spaces to a multiple of 8 bytes."""
    entries, offset = {}, 0
    for name, a in tensors:
        nbytes = a.size * 4
        entries[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for _, a in tensors:
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
    return offset


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()

    r = GGUFReader(args.model)
    if field(r, "general.architecture") != "llama":
        sys.exit("not a llama GGUF")
    n_head = int(field(r, "llama.attention.head_count"))
    n_kv = int(field(r, "llama.attention.head_count_kv", n_head))
    d_model = int(field(r, "llama.embedding_length"))
    tokens = field(r, "tokenizer.ggml.tokens")

    tensors = []
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        a = a.reshape([int(x) for x in reversed(t.shape)])  # GGUF lists the contiguous dim first
        if t.name.endswith(".attn_q.weight"):
            a = to_rotate_half(a, n_head)
        elif t.name.endswith(".attn_k.weight"):
            a = to_rotate_half(a, n_kv)
        tensors.append((hf_name(t.name), a))
    tied = all(name != "lm_head.weight" for name, _ in tensors)

    out = pathlib.Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    n = args.shards
    if n == 1:
        write_safetensors(tmp / "model.safetensors", tensors)
    else:
        # Split into n runs of roughly equal bytes, in file order.
        total = sum(a.size * 4 for _, a in tensors)
        groups, acc = [[] for _ in range(n)], 0
        for name, a in tensors:
            groups[min(n - 1, acc * n // total)].append((name, a))
            acc += a.size * 4
        weight_map = {}
        for k, group in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            write_safetensors(tmp / fname, group)
            weight_map.update({name: fname for name, _ in group})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    bos = field(r, "tokenizer.ggml.bos_token_id")
    eos = field(r, "tokenizer.ggml.eos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d_model,
        "intermediate_size": int(field(r, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(r, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": d_model // n_head,
        "hidden_act": "silu",
        "rms_norm_eps": float(field(r, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(r, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(field(r, "llama.context_length")),
        "vocab_size": int(field(r, "llama.vocab_size", len(tokens))),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "torch_dtype": "float32",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))

    # tokenizer.json: byte-level BPE over the GGUF vocabulary and merges, SmolLM2's pre-tokenizer (each digit
    # split off, then GPT-2's byte-level regex without a prefix space), control tokens as special added tokens.
    if field(r, "tokenizer.ggml.model") != "gpt2":
        sys.exit("only gpt2 (byte-level BPE) tokenizers are converted")
    types = field(r, "tokenizer.ggml.token_type")
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a repeated string keeps its first id
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_TYPE_CONTROL
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": list(field(r, "tokenizer.ggml.merges")),
        },
    }
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tok_config = {
        "bos_token": None if bos is None else tokens[int(bos)],
        "eos_token": None if eos is None else tokens[int(eos)],
        "add_bos_token": bool(field(r, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": field(r, "tokenizer.chat_template"),
        "model_max_length": config["max_position_embeddings"],
    }
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))

    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"wrote {out} ({len(tensors)} tensors, {n} shard(s), tied embeddings: {tied})", file=sys.stderr)


if __name__ == "__main__":
    main()
