#!/usr/bin/env python3
"""Generate the independent oracle vectors for quantfleet-quant's number formats.

The oracle is PyPI ml-dtypes==0.6.0 (not our code). Run it from a venv:
    python3 -m venv ~/.cache/quantfleet/venv-quant
    ~/.cache/quantfleet/venv-quant/bin/pip install ml-dtypes==0.6.0 numpy
    ~/.cache/quantfleet/venv-quant/bin/python crates/quantfleet-quant/tests/vectors/gen_vectors.py

Output, one file per format, beside this script:
    <fmt>_decode.txt   every code: "<code hex> <f32 bits hex of the decoded value>"
    <fmt>_encode.txt   "<f32 bits hex of input> <code hex>" for exact values, ties, neighbours of ties,
                       subnormals, overflow, infinities, NaN and seeded log-uniform random values.
ml-dtypes quirks that the Rust tests account for (see /work/shared/ENVIRONMENT.md):
  * float8_e4m3fn has no infinity and does NOT saturate: |x| > 464 (and +-inf) becomes NaN. That is our
    non-saturating mode; saturating mode is our own choice and is tested separately.
  * float4_e2m1fn maps NaN to -0.0, so NaN is kept out of the E2M1 encode vectors.
  * float8_e8m0fnu casts round to nearest; OCP MX scales use floor(log2(amax)) - emax instead, so only
    the E8M0 decode table comes from the oracle.
"""
import pathlib

import ml_dtypes
import numpy as np

OUT = pathlib.Path(__file__).resolve().parent
assert ml_dtypes.__version__ == "0.6.0", ml_dtypes.__version__

FORMATS = {
    "e4m3": (ml_dtypes.float8_e4m3fn, 8, True),
    "e5m2": (ml_dtypes.float8_e5m2, 8, True),
    "e2m1": (ml_dtypes.float4_e2m1fn, 4, False),
}


def f32_bits(values):
    return np.asarray(values, dtype=np.float32).view(np.uint32)


def decode_table(dtype, nbits):
    codes = np.arange(1 << nbits, dtype=np.uint8)
    if nbits == 8:
        values = codes.view(dtype).astype(np.float32)
    else:
        # ml-dtypes stores a 4-bit value in the low bits of one byte.
        values = np.array([np.uint8(c).view(dtype).astype(np.float32) for c in codes], dtype=np.float32)
    return codes, values


def encode(dtype, nbits, xs):
    xs = np.asarray(xs, dtype=np.float32)
    codes = xs.astype(dtype).view(np.uint8)
    if nbits == 4:
        codes = codes & 0x0F
    return codes


def encode_inputs(values, allow_nan, seed):
    finite = np.unique(np.abs(values[np.isfinite(values)]).astype(np.float64))
    xs = [finite]
    mids = (finite[:-1] + finite[1:]) / 2.0  # exact ties between neighbouring codes
    mids32 = mids.astype(np.float32)
    xs += [mids32, np.nextafter(mids32, np.float32(np.inf)), np.nextafter(mids32, np.float32(0))]
    top, step = finite[-1], finite[-1] - finite[-2]
    over = np.float32([top + step / 2, top + step, top * 1.01, top * 2, 1e10, 3.0e38])
    xs += [over, np.nextafter(over, np.float32(np.inf)), np.nextafter(over, np.float32(0))]
    tiny = finite[1]  # smallest subnormal
    xs += [np.float32([tiny / 2, tiny / 4, tiny * 0.75, 1e-30, 1e-40, 1.4e-45, 0.0])]
    xs += [np.nextafter(np.float32([tiny / 2]), np.float32(1)), np.nextafter(np.float32([tiny / 2]), np.float32(0))]
    rng = np.random.default_rng(seed)
    lo, hi = np.log2(tiny) - 3, np.log2(top) + 2
    xs += [np.exp2(rng.uniform(lo, hi, 4000)).astype(np.float32)]
    xs = np.concatenate([np.asarray(x, dtype=np.float32) for x in xs])
    xs = np.concatenate([xs, -xs, np.float32([np.inf, -np.inf])])
    if allow_nan:
        xs = np.concatenate([xs, np.float32([np.nan, -np.nan])])
    return xs


def main():
    for seed, (name, (dtype, nbits, allow_nan)) in enumerate(FORMATS.items()):
        codes, values = decode_table(dtype, nbits)
        with open(OUT / f"{name}_decode.txt", "w") as f:
            f.write(f"# ml-dtypes {ml_dtypes.__version__} {dtype.__name__}: code -> f32 bits of the value\n")
            for c, b in zip(codes, f32_bits(values)):
                f.write(f"{c:02x} {b:08x}\n")
        xs = encode_inputs(values, allow_nan, seed)
        enc = encode(dtype, nbits, xs)
        with open(OUT / f"{name}_encode.txt", "w") as f:
            f.write(f"# ml-dtypes {ml_dtypes.__version__} {dtype.__name__}: f32 bits of input -> code\n")
            for b, c in zip(f32_bits(xs), enc):
                f.write(f"{b:08x} {c:02x}\n")
    # E8M0 decode table only (casts round to nearest, which is not the OCP MX rule).
    codes = np.arange(256, dtype=np.uint8)
    values = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    with open(OUT / "e8m0_decode.txt", "w") as f:
        f.write(f"# ml-dtypes {ml_dtypes.__version__} float8_e8m0fnu: code -> f32 bits of the value\n")
        for c, b in zip(codes, f32_bits(values)):
            f.write(f"{c:02x} {b:08x}\n")
    # bfloat16 / float16 round-to-nearest-even from f32, checked against the `half` crate.
    rng = np.random.default_rng(7)
    xs = np.concatenate([
        rng.standard_normal(2000).astype(np.float32) * np.float32(100.0),
        np.exp2(rng.uniform(-30, 20, 2000)).astype(np.float32),
        np.float32([65504, 65520, 65519.99, 6e-8, 3e-8, 1e-10, 0.0, -0.0, np.inf, -np.inf]),
    ])
    for name, dtype in (("bf16", ml_dtypes.bfloat16), ("f16", np.float16)):
        with open(OUT / f"{name}_encode.txt", "w") as f:
            f.write(f"# numpy {np.__version__} / ml-dtypes {ml_dtypes.__version__} {name}: f32 bits -> 16-bit code\n")
            for b, c in zip(f32_bits(xs), xs.astype(dtype).view(np.uint16)):
                f.write(f"{b:08x} {c:04x}\n")


if __name__ == "__main__":
    main()
