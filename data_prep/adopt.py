"""`mom-prep adopt DIR`: meta.json for token files another tool wrote (nanoGPT's raw
train.bin / val.bin, or Megatron's .bin + .idx under those names), after checking them, so
mom-train reads them as it reads mom-prep's own output: same schema, same per-split record.

Each file is read once, in CHUNK_BYTES pieces of a memory map (flat memory, disk speed),
for the numbers mom-prep records as it writes: its sha256, its largest id and its count of
end-of-text tokens, under every dtype the file could be in. The dtype is the .idx's for
Megatron files; for nanoGPT's it is the one under which every id lies in the tokenizer's
vocabulary, and when both do (uint32 files of small ids read as valid uint16, every other
id 0) the one under which each file ends with end-of-text, as every nanoGPT file does.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mom_ds.files import write_text

from .format import DTYPES, META_FILE, SPLITS, DataError, bin_path, dtype_for_vocab, holds, meta_record, \
    meta_text
from .megatron import IndexSummary, read_idx
from .tokenizer import TokenizerInfo, load_tokenizer
from .writer import SplitStats

CHUNK_BYTES = 1 << 22  # a multiple of every itemsize; small enough that each view stays in cache


@dataclass
class Reading:
    """What one pass learned about a file read as one dtype."""
    max_id: int = -1
    n_eot: int = 0
    last: int = -1


@dataclass(frozen=True)
class Scan:
    path: Path
    sha256: str
    readings: dict[str, Reading]
    index: IndexSummary | None


@dataclass(frozen=True)
class Adopted:
    meta: dict
    n_bytes: int
    seconds: float


def scan(path: Path, dtypes: list[str], eot_id: int, index: IndexSummary | None) -> Scan:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    digest = hashlib.sha256()
    readings = {name: Reading() for name in dtypes}
    for start in range(0, len(data), CHUNK_BYTES):
        chunk = data[start:start + CHUNK_BYTES]
        digest.update(chunk)
        for name, reading in readings.items():
            ids = chunk.view(DTYPES[name])
            reading.max_id = max(reading.max_id, int(ids.max()))
            reading.n_eot += int(np.count_nonzero(ids == eot_id))
    for name, reading in readings.items():
        reading.last = int(data[-DTYPES[name].itemsize:].view(DTYPES[name])[0])
    return Scan(path, digest.hexdigest(), readings, index)


def _split_files(directory: Path) -> dict[str, Path]:
    paths = {split: bin_path(directory, split) for split in SPLITS}
    missing = [path.name for path in paths.values() if not path.is_file()]
    if missing:
        found = sorted(path.name for path in directory.glob("*.bin")) or "no .bin file"
        raise DataError(f"{directory} has no {' or '.join(missing)} (it holds {found}); mom-prep adopt "
                        f"reads train.bin and val.bin: name (or symlink) the training and validation token "
                        f"files so, with a Megatron .idx as train.idx / val.idx")
    for path in paths.values():
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty: not a token file (each split needs tokens; give val a few "
                            f"documents of the corpus)")
    return paths


def _candidates(paths: dict[str, Path], indexes: dict[str, IndexSummary | None], vocab_size: int,
                dtype: str) -> list[str]:
    """The dtypes the files could be in: the .idx's or --dtype's, else those the vocabulary and
    every file's size allow."""
    pinned = {f"{split}.idx": index.dtype for split, index in indexes.items() if index}
    if dtype != "auto":
        pinned["--dtype"] = dtype
    if len(set(pinned.values())) > 1:
        raise DataError(f"the dtypes disagree: {', '.join(f'{k} says {v}' for k, v in pinned.items())}; "
                        f"drop --dtype (a Megatron .idx names its own)")
    if pinned:
        names = [dtype_for_vocab(vocab_size, next(iter(pinned.values())))]  # raises if the vocabulary cannot fit
    else:
        names = [name for name in DTYPES if holds(name, vocab_size)]
    sizes = {path: path.stat().st_size for path in paths.values()}
    for path, size in sizes.items():
        if all(size % DTYPES[name].itemsize for name in names):
            named = f" (the dtype {' and '.join(pinned)} names)" if pinned else ""
            raise DataError(f"{path} is {size:,} bytes, not a whole number of {' or '.join(names)} tokens"
                            f"{named}: not a token file of that dtype, or a truncated one")
    # a size that fits uint32 fits uint16 too, so some name fits every file
    return [name for name in names if not any(size % DTYPES[name].itemsize for size in sizes.values())]


def _choose(scans: dict[str, Scan], names: list[str], info: TokenizerInfo) -> str:
    valid = [name for name in names if all(s.readings[name].max_id < info.vocab_size for s in scans.values())]
    if not valid:
        files = " and ".join(str(s.path) for s in scans.values())
        largest = ", ".join(f"{max(s.readings[name].max_id for s in scans.values())} as {name}" for name in names)
        raise DataError(f"{files} hold ids beyond the {info.vocab_size:,} tokens of tokenizer "
                        f"{info.spec!r} (largest: {largest}): they are not token files of this tokenizer; "
                        f"pass the --tokenizer it was made with{' and the right --dtype' if len(names) == 1 else ''}")
    if len(valid) > 1:
        valid = [name for name in valid if all(s.readings[name].last == info.eot_id for s in scans.values())]
        if len(valid) != 1:
            raise DataError(f"{' and '.join(str(s.path) for s in scans.values())} read as valid token ids both "
                            f"as uint16 and as uint32 (and end-of-text does not tell which); pass --dtype "
                            f"uint16 (nanoGPT's) or --dtype uint32")
    return valid[0]


def _stats(s: Scan, dtype: str, info: TokenizerInfo) -> SplitStats:
    reading = s.readings[dtype]
    if s.index:
        n_documents = s.index.n_documents
    elif reading.n_eot == 0:
        raise DataError(f"{s.path} holds no end-of-text token (id {info.eot_id} of {info.spec!r}), which ends "
                        f"every document of a nanoGPT file: not a token file of this tokenizer (check "
                        f"--tokenizer), or a Megatron .bin missing its .idx")
    else:
        # a last document cut before its end-of-text still counts, as mom-prep counts documents
        n_documents = reading.n_eot + (reading.last != info.eot_id)
    return SplitStats(s.path.name, s.path.stat().st_size // DTYPES[dtype].itemsize, n_documents, s.sha256,
                      s.path.with_suffix(".idx").name if s.index else None, reading.max_id)


def adopt(directory: Path, tokenizer: str = "gpt2", dtype: str = "auto", force: bool = False,
          show_progress: bool = True) -> Adopted:
    """Check the token files in `directory` and write its meta.json (atomically)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory; mom-prep adopt takes the folder holding train.bin "
                        f"and val.bin")
    meta_path = directory / META_FILE
    if meta_path.exists() and not force:
        raise DataError(f"{meta_path} already exists: {directory} is described already (by mom-prep or an "
                        f"earlier adopt); pass --force to check the files again and replace it")
    paths = _split_files(directory)
    info = load_tokenizer(tokenizer).info
    indexes = {split: read_idx(path.with_suffix(".idx")) if path.with_suffix(".idx").is_file() else None
               for split, path in paths.items()}
    names = _candidates(paths, indexes, info.vocab_size, dtype)
    start = time.perf_counter()
    scans = {}
    for split, path in paths.items():
        if show_progress:
            print(f"mom-prep adopt: reading {path} ({path.stat().st_size / 1e6:,.1f} MB)", file=sys.stderr,
                  flush=True)
        scans[split] = scan(path, names, info.eot_id, indexes[split])
    seconds = time.perf_counter() - start
    chosen = _choose(scans, names, info)
    kinds = sorted({"Megatron" if index else "nanoGPT" for index in indexes.values()})
    meta = meta_record(
        asdict(info), chosen, {split: asdict(_stats(s, chosen, info)) for split, s in scans.items()},
        created_by="mom-prep adopt", source=f"{' and '.join(kinds)} token files adopted in {directory}",
        split={"method": "as found: train.bin and val.bin were split by the tool that wrote them"},
        settings={"adopt": str(directory), "tokenizer": tokenizer, "dtype": dtype})
    write_text(meta_path, meta_text(meta))
    return Adopted(meta, sum(path.stat().st_size for path in paths.values()), seconds)
