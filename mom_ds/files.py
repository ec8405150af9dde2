"""Files written whole or not at all, and their checksums: the one atomic writer every
command uses (directories built whole: data_prep/output.py)."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replaced(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary name beside `path` to write the new file under; when the block ends
    normally it replaces `path` with os.replace (atomic on POSIX: a reader, or a process
    killed mid-write, sees the old file or the new one, never a part). On an error the
    partial file is removed. durable: flushed to disk first (a file that publishes others,
    as `latest` publishes a checkpoint)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, durable: bool = False) -> None:
    with replaced(path, durable) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
