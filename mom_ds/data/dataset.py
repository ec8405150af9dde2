"""TokenizedDataset: fixed-length windows over a memmapped `.bin` written by mom-prep."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from data_prep.format import DTYPES, DataError, bin_path, dtype_for_vocab, read_meta


class TokenizedDataset:
    """Non-overlapping windows of `seq_len + 1` tokens (stride `seq_len`) over `<split>.bin`.

    Window i is tokens[i*seq_len : i*seq_len + seq_len + 1], so inputs = w[:-1] and
    targets = w[1:] cover every token of the stream exactly once as a target.
    Everything about the file is checked on open so a bad directory fails here, with the
    file named, and not as garbage tokens thousands of steps later.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", seq_len: int = 1024,
                 verify_checksum: bool = False, vocab_size: int | None = None) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.seq_len = seq_len
        self.meta = read_meta(self.data_dir)
        tok = self.meta["tokenizer"]
        self.vocab_size: int = int(tok["vocab_size"])
        self.eot_id: int = int(tok["eot_id"])
        self.dtype: np.dtype = DTYPES[self.meta["dtype"]]
        self.path = bin_path(self.data_dir, split)
        self.n_tokens: int = self._validate(vocab_size)
        if verify_checksum:
            self._verify_checksum()
        self._tokens: np.memmap | None = None

    def _validate(self, model_vocab: int | None) -> int:
        meta_path = self.data_dir / "meta.json"
        split_meta = self.meta["splits"].get(self.split)
        if split_meta is None:
            raise DataError(f"{meta_path} has no split {self.split!r} (has {sorted(self.meta['splits'])})")
        if not self.path.is_file():
            raise DataError(f"{self.path} is missing; re-run mom-prep --out {self.data_dir} --overwrite")
        dtype_for_vocab(self.vocab_size, self.meta["dtype"])  # raises if the vocab cannot fit the dtype
        if not 0 <= self.eot_id < self.vocab_size:
            raise DataError(f"{meta_path}: eot_id {self.eot_id} is outside the vocabulary of {self.vocab_size}")
        largest = split_meta.get("max_token_id")  # written by mom-prep since format 1 + this field
        if largest is not None and largest >= self.vocab_size:
            raise DataError(f"{meta_path}: {self.split}.bin holds token id {largest}, outside the "
                            f"vocabulary of {self.vocab_size} the file says it uses; re-run mom-prep "
                            f"--out {self.data_dir} --overwrite")
        if model_vocab is not None and model_vocab < self.vocab_size:
            raise DataError(f"the model's vocab_size {model_vocab} is smaller than the data's "
                            f"{self.vocab_size} ({meta_path}); raise the model's vocab_size")
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise DataError(f"{self.path} is {size} bytes, not a multiple of {self.meta['dtype']}'s "
                            f"{self.dtype.itemsize}: it is truncated; re-run mom-prep --out {self.data_dir} --overwrite")
        n_tokens = size // self.dtype.itemsize
        if n_tokens != split_meta["n_tokens"]:
            raise DataError(f"{self.path} holds {n_tokens} tokens but {meta_path} says {split_meta['n_tokens']}: "
                            f"the file was truncated or replaced; re-run mom-prep --out {self.data_dir} --overwrite")
        if n_tokens < self.seq_len + 1:
            raise DataError(f"{self.path} has {n_tokens} tokens, fewer than one window of seq_len+1 = "
                            f"{self.seq_len + 1}; lower seq_len or give this split more data (mom-prep --val-fraction)")
        return n_tokens

    def _verify_checksum(self) -> None:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        expected = self.meta["splits"][self.split]["sha256"]
        if digest.hexdigest() != expected:
            raise DataError(f"{self.path} has sha256 {digest.hexdigest()}, meta.json says {expected}: "
                            f"the file is corrupt; re-run mom-prep --out {self.data_dir} --overwrite")

    @property
    def tokens(self) -> np.memmap:
        # Opened lazily so the dataset pickles cheaply into DataLoader workers (see __getstate__).
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}

    def __len__(self) -> int:
        return (self.n_tokens - 1) // self.seq_len

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        start = (i % n) * self.seq_len
        window = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        # every window is checked as it is read (a max over seq_len tokens): an id the model
        # cannot embed is this message, not an IndexError or a device-side assert mid-step
        if window.max() >= self.vocab_size or window.min() < 0:
            bad = int(np.argmax((window >= self.vocab_size) | (window < 0)))
            raise DataError(f"{self.path}: token {start + bad} is id {int(window[bad])}, outside "
                            f"the vocabulary of {self.vocab_size} in {self.data_dir / 'meta.json'}; "
                            f"the file or its meta.json is wrong (dtype {self.meta['dtype']}?); "
                            f"re-run mom-prep --out {self.data_dir} --overwrite")
        return window

    def windows(self, indices) -> np.ndarray:
        """A batch: int64 array of shape (len(indices), seq_len + 1)."""
        return np.stack([self[int(i)] for i in indices])

    def __repr__(self) -> str:
        return (f"TokenizedDataset({str(self.path)!r}, n_tokens={self.n_tokens}, seq_len={self.seq_len}, "
                f"windows={len(self)}, vocab_size={self.vocab_size}, dtype={self.meta['dtype']})")
