"""The on-disk format shared by the writer (mom-prep) and the reader (mom_ds.data).

A prepared directory holds `train.bin`, `val.bin` (flat little-endian token ids, each
document followed by end-of-text: nanoGPT's format), `meta.json` (this module's schema) and,
optionally, Megatron `.idx` files beside the `.bin` files (see `data_prep.megatron`).

This module imports only numpy and the standard library, so `mom-prep` starts without
pulling in torch and the reader does not depend on the tokenizer stack.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mom_ds.errors import BAD_INPUT

FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
# Little-endian explicitly: nanoGPT writes native order, which is little-endian everywhere it runs.
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class DataError(ValueError):
    """A corpus, tokenizer or prepared directory that cannot be used; the message names the fix."""
    exit_code = BAD_INPUT


def holds(name: str, vocab_size: int) -> bool:
    """Whether dtype `name` holds every id of a vocabulary of `vocab_size`."""
    return vocab_size <= 2 ** (8 * DTYPES[name].itemsize)


def dtype_for_vocab(vocab_size: int, forced: str | None = None) -> str:
    """uint16 when every id fits (ids < 65536), else uint32; `forced` pins one and is checked."""
    name = forced or ("uint16" if holds("uint16", vocab_size) else "uint32")
    if name not in DTYPES:
        raise DataError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    if not holds(name, vocab_size):
        raise DataError(
            f"a vocabulary of {vocab_size} tokens does not fit {name} "
            f"(at most {2 ** (8 * DTYPES[name].itemsize)} ids); use --dtype uint32 or --dtype auto"
        )
    return name


def bin_path(data_dir: Path, split: str) -> Path:
    return Path(data_dir) / f"{split}.bin"


def meta_record(tokenizer: dict, dtype: str, splits: dict[str, dict], *, created_by: str, source: str,
                split: dict, settings: dict) -> dict:
    """meta.json's content, in its key order: what mom-prep writes and `mom-prep adopt` writes
    for existing files (they differ only in the provenance fields created_by, source, split
    and settings), so the reader and a run's data fingerprint treat both alike."""
    return {
        "format_version": FORMAT_VERSION,
        "created_by": created_by,
        "tokenizer": tokenizer,
        "dtype": dtype,
        "byte_order": "little",
        "source": source,
        "split": split,
        "splits": splits,
        "settings": settings,
    }


def meta_text(meta: dict) -> str:
    return json.dumps(meta, indent=2) + "\n"


def read_meta(data_dir: str | Path) -> dict:
    """Load and sanity-check `<data_dir>/meta.json`; raise DataError naming the fix."""
    data_dir = Path(data_dir)
    path = data_dir / META_FILE
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; prepare it with mom-prep --out {data_dir}")
    if not path.is_file():
        raise DataError(f"{path} is missing: {data_dir} is not a finished mom-prep output; re-run mom-prep --out {data_dir}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); re-run mom-prep --out {data_dir} --overwrite") from err
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {version!r}, this reader reads {FORMAT_VERSION}; re-run mom-prep --overwrite")
    missing = [key for key in ("tokenizer", "dtype", "splits") if key not in meta]
    missing += [f"tokenizer.{key}" for key in ("vocab_size", "eot_id") if key not in meta.get("tokenizer", {})]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; re-run mom-prep --out {data_dir} --overwrite")
    if meta["dtype"] not in DTYPES:
        raise DataError(f"{path} names dtype {meta['dtype']!r}; expected one of {sorted(DTYPES)}")
    return meta
