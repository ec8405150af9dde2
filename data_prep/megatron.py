"""Megatron "mmap" `.idx` files, so Megatron-DeepSpeed and gpt-neox read our `.bin` as is.

Layout (anchors.md 5b; identical in Megatron-LM, Megatron-DeepSpeed, gpt-neox), little-endian:
  magic b"MMIDIDX\\x00\\x00" | <Q version 1 | <B dtype code | <Q S sequences | <Q D = S + 1
  | int32[S] sizes | int64[S] byte pointers (exclusive prefix sum of sizes * itemsize)
  | int64[D] doc_idx = 0..S
One sequence per document (no sentence splitting), its end-of-text included in its size.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# uint32 has no Megatron code; our ids are < 2**31, whose uint32 bytes equal int32's, so int32 (4) reads them.
DTYPE_CODES = {"uint16": 8, "uint32": 4}
ITEMSIZE = {"uint16": 2, "uint32": 4}
CHUNK = 1 << 20  # documents per write, so the index is streamed with flat memory


def write_idx(idx_path: Path, sizes_path: Path, dtype: str) -> None:
    """Write `idx_path` from a raw little-endian int32 file of per-document token counts."""
    sizes = np.memmap(sizes_path, dtype="<i4", mode="r") if sizes_path.stat().st_size else np.zeros(0, "<i4")
    count = len(sizes)
    with open(idx_path, "wb") as f:
        f.write(MAGIC + struct.pack("<QBQQ", VERSION, DTYPE_CODES[dtype], count, count + 1))
        for start in range(0, count, CHUNK):
            f.write(np.ascontiguousarray(sizes[start:start + CHUNK]).tobytes())
        offset = 0
        for start in range(0, count, CHUNK):
            chunk = sizes[start:start + CHUNK].astype("<i8")
            ends = np.cumsum(chunk) * ITEMSIZE[dtype] + offset
            f.write((ends - chunk * ITEMSIZE[dtype]).astype("<i8").tobytes())
            offset = int(ends[-1])
        for start in range(0, count + 1, CHUNK):
            f.write(np.arange(start, min(start + CHUNK, count + 1), dtype="<i8").tobytes())
