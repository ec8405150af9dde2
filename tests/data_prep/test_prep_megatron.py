"""--megatron-idx: read back by an independent reader written from the documented layout (anchors.md 5b)."""
import json
import struct

import numpy as np
import pytest

from data_prep import megatron
from data_prep.pipeline import PrepSettings, prepare

DTYPE_OF_CODE = {8: np.dtype("<u2"), 4: np.dtype("<i4")}


def read_idx(path):
    """Megatron MMapIndexedDataset.Index, from the table: 34-byte header, sizes, pointers, doc_idx."""
    data = path.read_bytes()
    assert data[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack("<Q", data[9:17])
    code, = struct.unpack("<B", data[17:18])
    seq_count, doc_count = struct.unpack("<QQ", data[18:34])
    offset = 34
    sizes = np.frombuffer(data, "<i4", seq_count, offset)
    offset += 4 * seq_count
    pointers = np.frombuffer(data, "<i8", seq_count, offset)
    offset += 8 * seq_count
    doc_idx = np.frombuffer(data, "<i8", doc_count, offset)
    assert offset + 8 * doc_count == len(data)
    return version, code, sizes, pointers, doc_idx


def megatron_documents(prefix):
    """Documents as Megatron's reader returns them: .bin slices at pointers, of sizes, in the code's dtype."""
    _, code, sizes, pointers, _ = read_idx(prefix.with_suffix(".idx"))
    raw = prefix.with_suffix(".bin").read_bytes()
    dtype = DTYPE_OF_CODE[code]
    return [np.frombuffer(raw, dtype, int(n), int(p)).tolist() for n, p in zip(sizes, pointers)]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_idx_matches_bin_and_documents(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(megatron, "CHUNK", 3)  # exercise the streamed (chunked) index writer
    docs = [f"document number {i} " * (i % 4) for i in range(11)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(PrepSettings(source=[str(tmp_path / "c.jsonl")], tokenizer="bytes", dtype=dtype, val_fraction=0.3,
                         megatron_idx=True), tmp_path / "out", show_progress=False)
    seen = []
    for split in ("train", "val"):
        version, code, sizes, pointers, doc_idx = read_idx(tmp_path / "out" / f"{split}.idx")
        itemsize = {"uint16": 2, "uint32": 4}[dtype]
        assert version == 1 and code == {"uint16": 8, "uint32": 4}[dtype]
        assert sizes.sum() * itemsize == (tmp_path / "out" / f"{split}.bin").stat().st_size
        assert pointers.tolist() == (np.concatenate([[0], np.cumsum(sizes)[:-1]]) * itemsize).tolist()
        assert doc_idx.tolist() == list(range(len(sizes) + 1))
        seen += megatron_documents(tmp_path / "out" / split)
    assert sorted(seen) == sorted(list(d.encode()) + [256] for d in docs)
    assert not list((tmp_path / "out").glob(".*"))  # the temporary sizes files are gone
