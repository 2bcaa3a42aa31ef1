#!/usr/bin/env python3
"""Writes tests/fixtures/gguf-quants/quants.gguf: small tensors of every quantized ggml type
edgemoe reads, each beside `NAME.expected`, the f32 values the `gguf` package (0.19) decodes
them to. tests/gguf_quants.rs compares edgemoe's dequantization with them bit for bit.

Where `gguf` has a quantizer (Q8_0, Q4_0, Q4_1, MXFP4) the blocks come from it; the k-quants
have none in `gguf`, so their blocks are random bytes with finite f16 scales (every scale, min
and quant bit pattern then occurs). MXFP4 also gets random blocks, so every e8m0 exponent
(0 and 1 are the subnormal halves) is covered.

usage: python3 tools/make_gguf_quant_fixtures.py [OUT]
"""
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize, dequantize, GGML_QUANT_SIZES

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests/fixtures/gguf-quants/quants.gguf"
rng = np.random.default_rng(27)


def finite_f16(n):
    """n random finite f16 bit patterns (normals, subnormals, zeros, both signs)."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
    exp = (bits >> 10) & 0x1F
    bits = np.where(exp == 0x1F, bits & 0x83FF, bits)  # inf/NaN exponent -> subnormal
    return bits.astype(np.uint16)


def random_blocks(qtype, rows, cols, f16_fields):
    """Random blocks of `qtype` for a rows x cols tensor; `f16_fields` are the byte offsets of
    f16 values in a block, replaced by finite ones."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for at in f16_fields:
        raw[:, at:at + 2] = finite_f16(n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, cols // block * nbytes)


def main():
    w = gguf.GGUFWriter(str(OUT), "quant-fixture")
    cases = []
    # Quantized by `gguf` itself.
    for qtype, name in [(T.Q8_0, "q8_0"), (T.Q4_0, "q4_0"), (T.Q4_1, "q4_1"), (T.Q5_0, "q5_0"),
                        (T.Q5_1, "q5_1"), (T.MXFP4, "mxfp4")]:
        x = (rng.standard_normal((3, 96)) * rng.uniform(0.01, 4.0, size=(3, 1))).astype(np.float32)
        cases.append((name, qtype, quantize(x, qtype)))
    # Random blocks: every bit pattern of the k-quants' packed scales and quants.
    cases.append(("q4_k", T.Q4_K, random_blocks(T.Q4_K, 3, 512, [0, 2])))
    cases.append(("q5_k", T.Q5_K, random_blocks(T.Q5_K, 3, 512, [0, 2])))
    cases.append(("q6_k", T.Q6_K, random_blocks(T.Q6_K, 3, 512, [208])))
    cases.append(("q5_0_random", T.Q5_0, random_blocks(T.Q5_0, 2, 64, [0])))
    cases.append(("q5_1_random", T.Q5_1, random_blocks(T.Q5_1, 2, 64, [0, 2])))
    mx = random_blocks(T.MXFP4, 4, 64, []).reshape(-1, 17)
    mx[:, 0] = rng.integers(100, 140, size=len(mx))  # weights' range
    mx[:5, 0] = [0, 1, 2, 254, 255]  # the edges: subnormal halves, and overflow to inf
    mx = mx.reshape(4, -1)
    cases.append(("mxfp4_random", T.MXFP4, mx))
    for name, qtype, raw in cases:
        with np.errstate(over="ignore"):
            want = dequantize(raw, qtype).astype(np.float32)
        assert not np.isnan(want).any(), name
        w.add_tensor(name, raw, raw_dtype=qtype)
        w.add_tensor(name + ".expected", want)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(cases)} quantized tensors)")


if __name__ == "__main__":
    main()
