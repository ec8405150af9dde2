"""prepare(): source -> batches -> tokenizer workers -> train/val split -> .bin/.idx/meta.json.

Memory stays flat: documents are read lazily and grouped into batches of about
BATCH_CHARS characters, at most 2 batches per worker are in flight, and each finished batch
is appended to the output files (in source order, whatever the number of workers) and freed.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .format import DTYPES, META_FILE, DataError, dtype_for_vocab, meta_record, meta_text
from .output import finished_settings, partial_dir
from .progress import Progress
from .sources import local_fingerprint, Source, SourceOptions, resolve_source
from .tokenizer import Tokenizer, load_tokenizer
from .writer import SplitStats, SplitWriter

BATCH_CHARS = 1 << 18  # ~256 KB of text per task: big enough to amortise IPC, small enough to balance workers
TRAINED_TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class PrepSettings:
    """Everything that determines the output; stored in meta.json to recognise a finished run."""
    source: list[str]
    tokenizer: str = "gpt2"
    val_fraction: float = 0.0005
    seed: int = 2357
    dtype: str = "auto"
    megatron_idx: bool = False
    train_tokenizer: int | None = None
    source_options: SourceOptions = field(default_factory=SourceOptions)


@dataclass(frozen=True)
class PrepResult:
    out: Path
    skipped: bool  # True when `out` was already finished with the same settings
    meta: dict


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# Worker-process state, set once by the pool initializer (inherited, not pickled, under fork).
_worker: tuple[Tokenizer, np.dtype] | None = None


def _init_worker(tokenizer: Tokenizer, dtype: np.dtype) -> None:
    global _worker
    _worker = (tokenizer, dtype)
    # a forked worker inherits its parent's handlers; the pool ends its workers by SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    tokenizer, dtype = _worker
    tokens, lengths = tokenizer.encode_docs(texts)
    # Narrowing in the worker halves what crosses the pipe for uint16 outputs.
    return tokens.astype(dtype), lengths, sum(map(len, texts))


def _tokenize(batches: Iterator[list[str]], tokenizer: Tokenizer, dtype: np.dtype,
              num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Encoded batches in input order; with num_proc > 1 a bounded number in flight."""
    if num_proc == 1:
        _init_worker(tokenizer, dtype)
        yield from map(_encode, batches)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers must not use threads across fork
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(num_proc, _init_worker, (tokenizer, dtype)) as pool:
        # Pool.imap would read the whole source ahead of slow workers; a bounded window keeps RAM flat.
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _load_or_train(settings: PrepSettings, source: Source, directory: Path) -> Tokenizer:
    if settings.train_tokenizer is None:
        return load_tokenizer(settings.tokenizer)
    from .bpe import train_bpe

    return train_bpe(_train_split(source.documents(), settings), settings.train_tokenizer,
                     directory / TRAINED_TOKENIZER_FILE)


def _goes_to_val(settings: PrepSettings) -> Callable[[], bool]:
    """The split's draw: one uniform number per document, in source order (numpy's stream is
    the same drawn one at a time or in batches), so it depends on the seed and the corpus
    only."""
    rng = np.random.default_rng(settings.seed)
    return lambda: bool(rng.random() < settings.val_fraction)


def _train_split(documents: Iterable[str], settings: PrepSettings) -> Iterator[str]:
    """The documents that _write_splits puts in train.bin, so that a trained tokenizer has
    never seen the held-out text its model is scored on. The last one is held back: when no
    other document went to val, _write_splits gives it to val (if it is not the only one)."""
    goes_to_val = _goes_to_val(settings)
    held, any_val, count = None, False, 0
    for doc in documents:
        count += 1
        if held is not None:
            yield held
        held = None
        if goes_to_val():
            any_val = True
        else:
            held = doc
    if held is not None and (any_val or settings.val_fraction == 0 or count == 1):
        yield held


def _write_splits(settings: PrepSettings, source: Source, tokenizer: Tokenizer, dtype: str,
                  directory: Path, num_proc: int, progress: Progress) -> dict[str, SplitStats]:
    writers = {split: SplitWriter(directory, split, dtype, settings.megatron_idx) for split in ("train", "val")}
    goes_to_val = _goes_to_val(settings)
    n_val = 0
    pending = None  # the newest batch is held back so its last document can still go to val

    def commit(tokens: np.ndarray, lengths: np.ndarray, to_val: np.ndarray) -> None:
        nonlocal n_val
        n_val += int(to_val.sum())
        per_token = np.repeat(to_val, lengths)
        writers["train"].write(tokens[~per_token], lengths[~to_val])
        writers["val"].write(tokens[per_token], lengths[to_val])

    has_text = False  # empty and whitespace documents are kept (as nanoGPT does), but not alone

    def documents() -> Iterator[str]:
        nonlocal has_text
        for doc in source.documents():
            has_text = has_text or bool(doc.strip())
            yield doc

    for tokens, lengths, chars in _tokenize(_batches(documents()), tokenizer, DTYPES[dtype], num_proc):
        progress.update(len(lengths), chars, len(tokens))
        if pending:
            commit(*pending)
        pending = (tokens, lengths, np.array([goes_to_val() for _ in lengths], dtype=bool))
    progress.close()
    if pending is None:
        raise DataError(f"the corpus is empty: {source.description} yielded no documents")
    tokens, lengths, to_val = pending
    # A non-zero fraction promises a val split: give it the last document if chance gave it none,
    # unless that would leave train empty.
    if settings.val_fraction > 0 and n_val + to_val.sum() == 0 and writers["train"].n_documents + len(lengths) > 1:
        to_val[-1] = True
    commit(tokens, lengths, to_val)
    stats = {split: writer.close() for split, writer in writers.items()}
    if not has_text:
        raise DataError(f"the corpus is empty: {source.description} has only empty or "
                        f"whitespace documents")
    if stats["train"].n_documents == 0:
        raise DataError(f"all {stats['val'].n_documents} documents went to val; lower --val-fraction")
    if settings.val_fraction > 0 and stats["val"].n_documents == 0:
        raise DataError(f"the corpus has {stats['train'].n_documents} document(s) with text: too few "
                        f"for a val split (--val-fraction {settings.val_fraction}). Fix: give more "
                        f"documents, or --val-fraction 0 to prepare train.bin only")
    return stats


def _meta(settings: PrepSettings, source: Source, tokenizer: Tokenizer, dtype: str,
          stats: dict[str, SplitStats]) -> dict:
    tokenizer_meta = asdict(tokenizer.info)
    if settings.train_tokenizer is not None:
        tokenizer_meta.update(spec=f"byte-level BPE of {settings.train_tokenizer} tokens trained on the train split",
                              file=TRAINED_TOKENIZER_FILE)
    return meta_record(
        tokenizer_meta, dtype, {split: asdict(s) for split, s in stats.items()}, created_by="mom-prep",
        source=source.description,
        split={"method": "per document, in source order: val if numpy default_rng(seed).random() < val_fraction",
               "seed": settings.seed, "val_fraction": settings.val_fraction},
        settings=json.loads(json.dumps(asdict(settings))))


def prepare(settings: PrepSettings, out: Path, num_proc: int = 1, overwrite: bool = False,
            show_progress: bool = True) -> PrepResult:
    """Write a finished data directory at `out`, or leave an identical finished one alone."""
    if not 0 <= settings.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {settings.val_fraction}")
    if num_proc < 1:
        raise DataError(f"--num-proc must be >= 1, got {num_proc}")
    wanted = json.loads(json.dumps(asdict(settings)))
    existing = finished_settings(out)
    if existing is not None and not overwrite:
        if existing == wanted:
            meta = json.loads((out / META_FILE).read_text())
            before, now = meta.get("source_fingerprint"), local_fingerprint(settings.source)
            if before is not None and now is not None and before != now:
                raise DataError(f"{out} was prepared from {settings.source}, whose files have changed "
                                f"since (sizes or modification times); pass --overwrite to prepare "
                                f"it again")
            return PrepResult(out, True, meta)
        changed = {key: existing.get(key) for key in wanted if existing.get(key) != wanted[key]}
        raise DataError(f"{out} was prepared with different settings (there: {changed}); "
                        f"pass --overwrite to replace it")
    source = resolve_source(settings.source, settings.source_options)
    with partial_dir(out) as directory:
        tokenizer = _load_or_train(settings, source, directory)
        dtype = dtype_for_vocab(tokenizer.info.vocab_size, None if settings.dtype == "auto" else settings.dtype)
        progress = Progress(source.total, enabled=show_progress)
        stats = _write_splits(settings, source, tokenizer, dtype, directory, num_proc, progress)
        meta = {**_meta(settings, source, tokenizer, dtype, stats),
                "source_fingerprint": local_fingerprint(settings.source)}
        (directory / META_FILE).write_text(meta_text(meta))
    return PrepResult(out, False, meta)
