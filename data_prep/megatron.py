"""Megatron "mmap" `.idx` files, so Megatron-DeepSpeed and gpt-neox read our `.bin` as is.

Layout (anchors.md 5b; identical in Megatron-LM, Megatron-DeepSpeed, gpt-neox), little-endian:
  magic b"MMIDIDX\\x00\\x00" | <Q version 1 | <B dtype code | <Q S sequences | <Q D = S + 1
  | int32[S] sizes | int64[S] byte pointers (exclusive prefix sum of sizes * itemsize)
  | int64[D] doc_idx = 0..S
One sequence per document (no sentence splitting), its end-of-text included in its size.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# uint32 has no Megatron code; our ids are < 2**31, whose uint32 bytes equal int32's, so int32 (4) reads them.
DTYPE_CODES = {"uint16": 8, "uint32": 4}
ITEMSIZE = {"uint16": 2, "uint32": 4}
CHUNK = 1 << 20  # documents per write (or read), so the index is streamed with flat memory
HEADER = struct.Struct("<QBQQ")  # version, dtype code, sequences, documents + 1 (after MAGIC)
HEADER_BYTES = len(MAGIC) + HEADER.size
# Megatron's other dtype codes, named when a file uses one
OTHER_CODES = {1: "uint8", 2: "int8", 3: "int16", 5: "int64", 6: "float64", 7: "float32"}


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


@dataclass(frozen=True)
class IndexSummary:
    dtype: str
    n_documents: int


def read_idx(idx_path: Path) -> IndexSummary:
    """Check a Megatron `.idx` (header, length, and its sizes, summed in chunks, against its
    `.bin`) and say what it holds."""
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:len(MAGIC)] != MAGIC:
        raise DataError(f"{idx_path} is not a Megatron index (no MMIDIDX header); remove it to adopt "
                        f"{idx_path.with_suffix('.bin').name} as nanoGPT tokens")
    version, code, count, doc_count = HEADER.unpack(head[len(MAGIC):])
    names = {c: name for name, c in DTYPE_CODES.items()}
    if version != VERSION or code not in names:
        what = f"version {version}" if version != VERSION else f"{OTHER_CODES.get(code, f'dtype code {code}')} tokens"
        raise DataError(f"{idx_path} is a Megatron index of {what}; mom-ds reads version {VERSION} "
                        f"indexes of uint16 (code 8) or int32 (code 4) tokens: re-export the corpus so")
    expected = HEADER_BYTES + count * (4 + 8) + doc_count * 8
    if idx_path.stat().st_size != expected:
        raise DataError(f"{idx_path} is {idx_path.stat().st_size} bytes, its header promises {expected}: "
                        f"it is truncated or not an index of {count} sequences")
    sizes = np.memmap(idx_path, dtype="<i4", mode="r", offset=HEADER_BYTES, shape=(count,)) if count else []
    n_tokens = sum(int(sizes[start:start + CHUNK].sum(dtype=np.int64)) for start in range(0, count, CHUNK))
    bin_file = idx_path.with_suffix(".bin")
    if n_tokens * ITEMSIZE[names[code]] != bin_file.stat().st_size:
        raise DataError(f"{idx_path} indexes {n_tokens:,} {names[code]} tokens, {bin_file} holds "
                        f"{bin_file.stat().st_size:,} bytes: they are not one dataset's .idx and .bin")
    # doc_idx holds each document's first sequence and one past the last
    return IndexSummary(names[code], max(doc_count - 1, 0))
