"""Atomic output: build `<out>.partial`, then rename it to `<out>` only once it is complete.

A finished directory is one with meta.json (written last, inside the partial directory), so
an interrupted run never leaves anything at `<out>` that looks finished.
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .format import META_FILE, DataError


def finished_settings(out: Path) -> dict | None:
    """The settings a finished `out` was made with; None if `out` is absent (or an empty folder)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    meta = out / META_FILE
    if not meta.is_file():
        # Never delete a folder we did not write, even with --overwrite.
        raise DataError(f"{out} exists and is not a mom-prep output (no {META_FILE}); remove it or choose another --out")
    try:
        return json.loads(meta.read_text()).get("settings", {})
    except json.JSONDecodeError:
        return {}


@contextmanager
def partial_dir(out: Path) -> Iterator[Path]:
    """Yield an empty `<out>.partial`; on success replace `<out>` with it, on failure delete it."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a killed run; never finished, safe to drop
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = out.with_name(out.name + ".old")
    if out.exists():
        out.rename(old)
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)
