"""TokenizedDataset: window layout and every validation error on open."""
import json
import pickle

import numpy as np
import pytest

from data_prep.pipeline import PrepSettings, prepare
from mom_ds.data import DataError, TokenizedDataset, read_meta


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox " * (10 + i))
    prepare(PrepSettings(source=[str(corpus)], tokenizer="bytes", val_fraction=0.2, seed=0), root / "out",
            show_progress=False)
    return root / "out"


def copy_of(data_dir, tmp_path):
    target = tmp_path / "copy"
    target.mkdir()
    for f in data_dir.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def test_windows_are_shifted_slices_of_the_stream(data_dir):
    ds = TokenizedDataset(data_dir, "train", seq_len=16)
    tokens = np.fromfile(data_dir / "train.bin", dtype="<u2")
    assert ds.n_tokens == len(tokens) and ds.dtype == np.dtype("<u2")
    assert (ds.vocab_size, ds.eot_id, ds.seq_len) == (257, 256, 16)
    assert len(ds) == (len(tokens) - 1) // 16
    for i in (0, 1, len(ds) - 1):
        window = ds[i]
        assert window.dtype == np.int64 and window.shape == (17,)
        assert np.array_equal(window, tokens[i * 16:i * 16 + 17])
    assert np.array_equal(ds[-1], ds[len(ds) - 1])
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert ds.windows([0, 2]).shape == (2, 17)
    assert np.array_equal(pickle.loads(pickle.dumps(ds))[3], ds[3])


def test_val_split_and_checksum(data_dir):
    ds = TokenizedDataset(data_dir, "val", seq_len=8, verify_checksum=True)
    assert ds.n_tokens == read_meta(data_dir)["splits"]["val"]["n_tokens"] > 0


def test_missing_directory_and_meta(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TokenizedDataset(tmp_path / "nowhere", seq_len=8)
    with pytest.raises(DataError, match="meta.json is missing"):
        TokenizedDataset(tmp_path, seq_len=8)


def test_truncated_bin(data_dir, tmp_path):
    d = copy_of(data_dir, tmp_path)
    data = (d / "train.bin").read_bytes()
    (d / "train.bin").write_bytes(data[:-1])
    with pytest.raises(DataError, match="train.bin is .* not a multiple"):
        TokenizedDataset(d, seq_len=8)
    (d / "train.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match="train.bin holds .* tokens but .*meta.json says"):
        TokenizedDataset(d, seq_len=8)


def test_meta_disagreeing_with_bin(data_dir, tmp_path):
    d = copy_of(data_dir, tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    meta["tokenizer"]["vocab_size"] = 70000  # cannot be stored as uint16
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="does not fit uint16"):
        TokenizedDataset(d, seq_len=8)
    meta["tokenizer"]["vocab_size"] = 257
    meta["dtype"] = "uint32"  # the file holds uint16: half as many uint32 tokens as meta says
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="holds .* tokens but"):
        TokenizedDataset(d, seq_len=8)


def test_corrupt_bytes_fail_checksum(data_dir, tmp_path):
    d = copy_of(data_dir, tmp_path)
    data = bytearray((d / "train.bin").read_bytes())
    data[10] ^= 1
    (d / "train.bin").write_bytes(bytes(data))
    TokenizedDataset(d, seq_len=8)  # size checks pass; only the checksum sees it
    with pytest.raises(DataError, match="sha256"):
        TokenizedDataset(d, seq_len=8, verify_checksum=True)


def test_too_short_split_and_small_model_vocab(data_dir):
    with pytest.raises(DataError, match="fewer than one window"):
        TokenizedDataset(data_dir, "val", seq_len=10**7)
    with pytest.raises(DataError, match="model's vocab_size 100 is smaller"):
        TokenizedDataset(data_dir, seq_len=8, vocab_size=100)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenizedDataset(data_dir, "test", seq_len=8)


def test_the_shared_byte_data_reads_back(data):
    """conftest's session corpus (mom_ds_testing.runs.write_byte_data): what the training
    tests' eval reads is there."""
    d = TokenizedDataset(data, split="val", seq_len=64)
    assert d.vocab_size == 257 and len(d) >= 16  # the tests' eval reads 16 windows
    assert d[0].shape == (65,) and d[0].max() <= 256
