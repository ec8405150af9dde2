"""Writing one split (`train.bin` or `val.bin`) as a stream, with its checksum and counts."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import DTYPES
from .megatron import write_idx


@dataclass(frozen=True)
class SplitStats:
    file: str
    n_tokens: int
    n_documents: int
    sha256: str
    idx: str | None
    max_token_id: int  # what a reader checks against its model's vocabulary


class SplitWriter:
    """Appends documents' tokens to `<dir>/<split>.bin`; optionally keeps sizes for a Megatron .idx."""

    def __init__(self, directory: Path, split: str, dtype: str, megatron_idx: bool) -> None:
        self.path = directory / f"{split}.bin"
        self.dtype = dtype
        self.file = open(self.path, "wb")
        self.digest = hashlib.sha256()
        # Per-document sizes go to disk, not a list, so memory stays flat for billions of tokens.
        self.sizes_path = directory / f".{split}.sizes" if megatron_idx else None
        self.sizes = open(self.sizes_path, "wb") if self.sizes_path else None
        self.n_tokens = 0
        self.n_documents = 0
        self.max_token_id = -1

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """`tokens` already in the output dtype; `lengths` per document, end-of-text included."""
        data = np.ascontiguousarray(tokens, dtype=DTYPES[self.dtype]).data
        self.file.write(data)
        self.digest.update(data)
        self.n_tokens += len(tokens)
        self.n_documents += len(lengths)
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        if self.sizes:
            self.sizes.write(lengths.astype("<i4").tobytes())

    def close(self) -> SplitStats:
        self.file.close()
        idx = None
        if self.sizes:
            self.sizes.close()
            idx_path = self.path.with_suffix(".idx")
            write_idx(idx_path, self.sizes_path, self.dtype)
            self.sizes_path.unlink()
            idx = idx_path.name
        return SplitStats(self.path.name, self.n_tokens, self.n_documents, self.digest.hexdigest(), idx,
                          self.max_token_id)
