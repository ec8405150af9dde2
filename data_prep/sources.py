"""Where documents come from: the built-in corpus, local files, saved datasets, the HF hub.

Every source yields documents (str) one at a time, in a fixed order, without holding the
corpus in memory (except a `.json` array or a `--txt-mode file` document, which are read
whole; use `.jsonl`, `.parquet` or `--txt-mode blank-line` for big files). An `.html` page is
one document: its readable text (html_text.py).

Non-UTF-8 policy: by default bytes that are not valid UTF-8 stop the run with the file and
byte offset named (silently altered training text is worse than a clear failure);
`--encoding-errors replace` substitutes U+FFFD and goes on.
"""
from __future__ import annotations

import glob
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .format import DataError
from .hub import hub_unreachable

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".html", ".htm")
# A `--txt-mode file` document is read whole; beyond this the user must pick a streaming layout.
MAX_WHOLE_FILE_BYTES = 1 << 30
HF_BATCH = 1000


@dataclass(frozen=True)
class SourceOptions:
    text_field: str = "text"
    txt_mode: str = "file"  # "file": one document per .txt file; "blank-line": blank lines separate documents
    encoding_errors: str = "strict"  # or "replace"
    hf_split: str = "train"
    hf_config: str | None = None
    streaming: bool = True


class Source:
    """A corpus: `description` goes into meta.json; `total` = (amount, unit) when known, for the ETA."""

    description: str
    total: tuple[int, str] | None = None  # unit is "bytes" (of files) or "docs"

    def documents(self) -> Iterator[str]:
        raise NotImplementedError


def _decode(data: bytes, errors: str, where: str, offset: int = 0) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: bytes that are not UTF-8 at byte offset {offset + err.start}; re-encode "
                        f"the file as UTF-8, or pass --encoding-errors replace to substitute U+FFFD") from err


class BuiltinSource(Source):
    """The Python standard library's own .py files (source and docstrings), one document per file.

    Test packages are left out (some are deliberately not UTF-8, and they dwarf the rest);
    files are taken in sorted path order so the corpus is the same on every run.
    """

    def __init__(self) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
        self.files = sorted((p for p in root.rglob("*.py") if not excluded & set(p.relative_to(root).parts)),
                            key=lambda p: p.relative_to(root).as_posix())
        if not self.files:
            raise DataError(f"no standard-library sources under {root}; this Python ships without them, "
                            f"so pass a corpus with --source")
        size = sum(p.stat().st_size for p in self.files)
        version = ".".join(map(str, sys.version_info[:3]))
        self.description = f"builtin: Python {version} standard library, {len(self.files)} .py files, {size} bytes"
        self.total = (size, "bytes")

    def documents(self) -> Iterator[str]:
        for path in self.files:
            # Python source is UTF-8 (PEP 3120); "replace" only keeps an odd installation usable.
            yield _decode(path.read_bytes(), "replace", str(path))


class FilesSource(Source):
    def __init__(self, files: list[Path], options: SourceOptions, description: str) -> None:
        self.files = files
        self.options = options
        self.description = description
        self.total = (sum(p.stat().st_size for p in files), "bytes")

    def documents(self) -> Iterator[str]:
        readers = {".txt": self._txt, ".jsonl": self._jsonl, ".json": self._json, ".parquet": self._parquet,
                   ".html": self._html, ".htm": self._html}
        for path in self.files:
            yield from readers[path.suffix](path)

    def _txt(self, path: Path) -> Iterator[str]:
        errors = self.options.encoding_errors
        if self.options.txt_mode == "file":
            if path.stat().st_size > MAX_WHOLE_FILE_BYTES:
                raise DataError(f"{path} is over {MAX_WHOLE_FILE_BYTES >> 30} GiB, too big to be one document; "
                                f"pass --txt-mode blank-line (documents separated by blank lines) or use .jsonl")
            yield _decode(path.read_bytes(), errors, str(path))
            return
        lines: list[str] = []
        offset = 0
        with open(path, "rb") as f:
            for raw in f:
                line = _decode(raw, errors, str(path), offset)
                offset += len(raw)
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).rstrip("\n")
                    lines = []
        if lines:
            yield "".join(lines).rstrip("\n")

    def _html(self, path: Path) -> Iterator[str]:
        """One document per page: its readable text (html_text.py); a page with none is skipped."""
        from .html_text import html_to_text

        text = html_to_text(_decode(path.read_bytes(), self.options.encoding_errors, str(path)))
        if text:
            yield text

    def _text_of(self, record, where: str) -> str:
        field = self.options.text_field
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: no text field {field!r} (found {keys}); pass --text-field NAME")
        if not isinstance(record[field], str):
            raise DataError(f"{where}: field {field!r} holds {type(record[field]).__name__}, not text")
        return record[field]

    def _jsonl(self, path: Path) -> Iterator[str]:
        offset = 0
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                where = f"{path}:{number}"
                line = _decode(raw, self.options.encoding_errors, str(path), offset)
                offset += len(raw)
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{where}: not valid JSON ({err})") from err
                    yield self._text_of(record, where)

    def _json(self, path: Path) -> Iterator[str]:
        text = _decode(path.read_bytes(), self.options.encoding_errors, str(path))
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data":  # JSON lines under a .json name, as `datasets` also accepts
                yield from self._jsonl(path)
                return
            raise DataError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records (or JSON lines)")
        for number, record in enumerate(records):
            yield self._text_of(record, f"{path}[{number}]")

    def _parquet(self, path: Path) -> Iterator[str]:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
        if self.options.text_field not in table.schema_arrow.names:
            raise DataError(f"{path}: no text field {self.options.text_field!r} "
                            f"(columns {table.schema_arrow.names}); pass --text-field NAME")
        for batch in table.iter_batches(batch_size=HF_BATCH, columns=[self.options.text_field]):
            yield from batch.column(0).to_pylist()


def _hf_texts(dataset, field: str, where: str) -> Iterator[str]:
    names = dataset.column_names
    if names is not None and field not in names:
        raise DataError(f"{where}: no text field {field!r} (columns {names}); pass --text-field NAME")
    for batch in dataset.iter(batch_size=HF_BATCH):
        for text in batch[field]:
            if not isinstance(text, str):
                raise DataError(f"{where}: a row's {field!r} is {type(text).__name__}, not text")
            yield text


class SavedDatasetSource(Source):
    """A directory written by `datasets.save_to_disk` (a Dataset, or a DatasetDict and --hf-split)."""

    def __init__(self, path: Path, options: SourceOptions) -> None:
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if options.hf_split not in loaded:
                raise DataError(f"{path} has splits {sorted(loaded)}, not {options.hf_split!r}; pass --hf-split")
            loaded = loaded[options.hf_split]
        self.dataset = loaded
        self.field = options.text_field
        self.description = f"saved dataset {path} ({len(loaded)} rows)"
        self.total = (len(loaded), "docs")

    def documents(self) -> Iterator[str]:
        return _hf_texts(self.dataset, self.field, self.description)


class HubSource(Source):
    """A Hugging Face hub dataset, streamed by default so nothing is cached whole on disk or in RAM."""

    def __init__(self, name: str, options: SourceOptions) -> None:
        import datasets

        if reason := hub_unreachable():
            raise DataError(f"cannot load the Hugging Face dataset {name!r}: {reason}. Fix: pass local "
                            f"files with --source, or, if the dataset is in your cache, set "
                            f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 to read it from there")
        try:
            self.dataset = datasets.load_dataset(name, options.hf_config, split=options.hf_split,
                                                 streaming=options.streaming)
        except Exception as err:  # datasets raises many types for "not found" / "offline"
            raise DataError(f"could not load {name!r} as a local path or a Hugging Face dataset "
                            f"({type(err).__name__}: {str(err)[:200]}); check the name, the network "
                            f"(HF_DATASETS_OFFLINE), or pass local files") from err
        self.field = options.text_field
        rows = None
        splits = getattr(self.dataset.info, "splits", None)
        if splits and options.hf_split in splits:
            rows = splits[options.hf_split].num_examples
        self.description = f"hf:{name}" + (f"/{options.hf_config}" if options.hf_config else "") + f" split={options.hf_split}"
        self.total = (rows, "docs") if rows else None

    def documents(self) -> Iterator[str]:
        return _hf_texts(self.dataset, self.field, self.description)


def _expand(spec: str) -> list[Path]:
    """Files named by one spec: a file, a folder (searched recursively) or a glob."""
    if glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"no files match {spec!r}")
        return matches
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not found:
            raise DataError(f"no {'/'.join(FILE_SUFFIXES)} files under {path}")
        return found
    if path.is_file():
        return [path]
    raise DataError(f"{spec}: no such file or directory")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).suffix in FILE_SUFFIXES or glob.has_magic(spec)


def local_fingerprint(specs: list[str]) -> str | None:
    """A hash of the names, sizes and modification times of the local files (or the built-in
    corpus) a --source names; None for a hub dataset, which is not looked up for this."""
    if specs == ["builtin"]:
        files = BuiltinSource().files
    elif len(specs) == 1 and not Path(specs[0]).exists() and not looks_like_path(specs[0]):
        return None
    else:
        files = [f for spec in specs for f in _expand(spec)]
    digest = hashlib.sha256()
    for path in sorted(files):
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def resolve_source(specs: list[str], options: SourceOptions) -> Source:
    """Pick the source kind from what `--source` names (see `mom-prep --help`)."""
    if specs == ["builtin"]:
        return BuiltinSource()
    if len(specs) == 1:
        spec = specs[0]
        if _is_saved_dataset(Path(spec)):
            return SavedDatasetSource(Path(spec), options)
        if not Path(spec).exists() and not looks_like_path(spec):
            return HubSource(spec, options)
    files = [f for spec in specs for f in _expand(spec)]
    unsupported = sorted({str(f) for f in files if f.suffix not in FILE_SUFFIXES})
    if unsupported:
        raise DataError(f"cannot read {unsupported[:3]}: supported files are {', '.join(FILE_SUFFIXES)}")
    return FilesSource(files, options, f"files: {' '.join(specs)} ({len(files)} files)")
