"""Files written whole or not at all, and their checksums: the one atomic writer every
command uses (directories built whole: data_prep/output.py)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator


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


def json_rows(path: str | Path, who: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, row) for each JSON row of a JSON-lines file (metrics.jsonl, routing.jsonl). A
    line that is not JSON (cut short when a full disk stopped the write) is skipped with a
    warning naming it; `who` prefixes the warning ("mom-report: ")."""
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"{who}warning: {path} line {number} is not a complete JSON row (cut short "
                  f"when it was written?): skipped: {line[:80]!r}", file=sys.stderr)
            continue
        yield line, row


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
