#!/usr/bin/env python3
"""Reference fixtures for kiln-gguf's dequantisation tests, made with the `gguf` Python package.

    python3 -m venv tools/.venv && tools/.venv/bin/pip install gguf numpy
    tools/.venv/bin/python tools/gguf_reference.py [--smollm2 PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes into crates/gguf/tests/fixtures/:

* `quant/<TYPE>.bin`: random raw blocks of that ggml type (fixed seed), with sane f16 scales
  (finite, no NaN/inf), and `quant/<TYPE>.f32`: what `gguf.quants.dequantize` makes of them
  (little-endian f32). The Rust test must reproduce them bit for bit.
* `quant/<TYPE>.in.f32` and `quant/<TYPE>.quantized`, for the types kiln-gguf quantises and
  gguf-py's numpy quantiser rounds exactly as ggml does (Q5_0, Q5_1): values and the blocks
  `gguf.quants.quantize` makes of them, which kiln-gguf's quantiser must reproduce byte for byte.
* with `--smollm2`: `smollm2_q4_1.json`, a few whole rows of `token_embd.weight` (Q8_0),
  `blk.0.attn_q.weight` (Q4_1) and `output_norm.weight` (F32) as gguf-py dequantises them,
  plus, for every tensor, its shape and two float64 checksums of the dequantised values (sum
  and a position-weighted sum), so the Rust test can check the whole file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "crates", "gguf", "tests", "fixtures")

T = GGMLQuantizationType

# (type, byte offsets of f16 scale fields within a block, offsets of f16 "min" fields)
BLOCK_SCALES: dict[GGMLQuantizationType, tuple[list[int], list[int]]] = {
    T.Q4_0: ([0], []),
    T.Q4_1: ([0], [2]),
    T.Q5_0: ([0], []),
    T.Q5_1: ([0], [2]),
    T.Q8_0: ([0], []),
    T.Q2_K: ([80], [82]),
    T.Q3_K: ([108], []),
    T.Q4_K: ([0], [2]),
    T.Q5_K: ([0], [2]),
    T.Q6_K: ([208], []),
    T.IQ4_NL: ([0], []),
    T.IQ4_XS: ([0], []),
}

# Number of elements per fixture: 2048 (64 blocks of 32, or 8 blocks of 256).
N_ELEMENTS = 2048


def random_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = N_ELEMENTS // block_size
    if qtype == T.F32:
        return rng.standard_normal(N_ELEMENTS).astype("<f4").view(np.uint8)
    if qtype == T.F16:
        vals = (rng.standard_normal(N_ELEMENTS) * 4).astype("<f2")
        # include some subnormals and signed zeros
        vals[:4] = np.array([0.0, -0.0, 1e-7, -3e-6], dtype="<f2")
        return vals.view(np.uint8)
    if qtype == T.BF16:
        bits = (rng.standard_normal(N_ELEMENTS) * 8).astype("<f4").view("<u4") >> 16
        return bits.astype("<u2").view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scales, mins = BLOCK_SCALES[qtype]
    for off in scales:
        d = (rng.uniform(-0.05, 0.05, n_blocks)).astype("<f2")
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    for off in mins:
        m = (rng.uniform(-0.5, 0.5, n_blocks)).astype("<f2")
        blocks[:, off : off + 2] = m.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def write_quant_fixtures() -> None:
    out_dir = os.path.join(FIXTURES, "quant")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(20261123)
    for qtype in [T.F32, T.F16, T.BF16, *BLOCK_SCALES]:
        raw = random_blocks(rng, qtype)
        values = dequantize(raw, qtype).astype("<f4").reshape(-1)
        assert values.size == N_ELEMENTS, (qtype, values.size)
        assert np.all(np.isfinite(values)), qtype
        raw.tofile(os.path.join(out_dir, f"{qtype.name}.bin"))
        values.tofile(os.path.join(out_dir, f"{qtype.name}.f32"))
        print(f"{qtype.name}: {raw.size} bytes -> {values.size} values")


# Types whose gguf-py quantiser is ggml's reference arithmetic (trunc of x/d + 16.5 or + 0.5,
# f32 throughout); gguf-py's Q8_0 rounds half to even where ggml rounds half away from zero.
QUANTIZED = [T.Q5_0, T.Q5_1, T.Q4_0, T.Q4_1]


def write_quantize_fixtures() -> None:
    out_dir = os.path.join(FIXTURES, "quant")
    rng = np.random.default_rng(20261205)
    for qtype in QUANTIZED:
        # Mostly small values with a few outliers, as trained weights are; one all-zero block.
        values = (rng.standard_normal(N_ELEMENTS) * 0.05).astype("<f4")
        outliers = rng.random(N_ELEMENTS) < 0.01
        values[outliers] *= 40
        values[:32] = 0
        blocks = quantize(values.reshape(-1, 32), qtype).reshape(-1)
        values.tofile(os.path.join(out_dir, f"{qtype.name}.in.f32"))
        blocks.tofile(os.path.join(out_dir, f"{qtype.name}.quantized"))
        print(f"{qtype.name}: {values.size} values -> {blocks.size} quantised bytes")


def checksums(values: np.ndarray) -> tuple[float, float]:
    v = values.astype(np.float64).reshape(-1)
    w = (np.arange(v.size, dtype=np.int64) % 997 + 1).astype(np.float64)
    return float(v.sum()), float(np.dot(v, w))


def write_smollm2_fixture(path: str) -> None:
    reader = GGUFReader(path)
    rows_wanted = {
        "token_embd.weight": [0, 1, 2, 6403, 49151],
        "blk.0.attn_q.weight": [0, 1, 63, 64, 575],
        "output_norm.weight": None,
    }
    fixture: dict = {"file_size": os.path.getsize(path), "rows": {}, "tensors": {}}
    for t in reader.tensors:
        # gguf-py's tensor.data is in row-major order (ggml ne reversed), like tensor_f32.
        values = dequantize(t.data, t.tensor_type)
        shape = [int(d) for d in reversed(t.shape.tolist())]
        values = values.reshape(shape)
        s, ws = checksums(values)
        fixture["tensors"][t.name] = {
            "type": t.tensor_type.name,
            "shape": shape,
            "sum": s,
            "weighted_sum": ws,
        }
        if t.name in rows_wanted:
            idx = rows_wanted[t.name]
            if idx is None:
                fixture["rows"][t.name] = {"rows": None, "values": [float(x) for x in values.reshape(-1)]}
            else:
                fixture["rows"][t.name] = {
                    "rows": idx,
                    "values": [[float(x) for x in values[i]] for i in idx],
                }
    out = os.path.join(FIXTURES, "smollm2_q4_1.json")
    with open(out, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print(f"wrote {out} ({os.path.getsize(out)} bytes, {len(fixture['tensors'])} tensors)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm2", help="path to SmolLM2-135M-Instruct.Q4_1.gguf (tools/fetch_smollm2.sh)")
    ap.add_argument("--quantize-only", action="store_true", help="only the quantiser fixtures")
    args = ap.parse_args()
    if not args.quantize_only:
        write_quant_fixtures()
    write_quantize_fixtures()
    if args.smollm2:
        write_smollm2_fixture(args.smollm2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
