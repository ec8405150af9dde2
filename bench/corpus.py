"""A real-English corpus of about 30M tokens from Debian documentation packages, through mom-prep.

    python bench/corpus.py --out DIR [--sources NAME ...] [--vocab 4096] [--val-fraction 0.02]
                           [--root-prefix DIR]

bench/repro.py calls prepare(out) and trains on the directory it returns. Any machine gets
the same text with `apt-get install` (Debian 12 "bookworm" package names):

  linux-doc       linux-doc-6.1: the kernel's Sphinx HTML documentation, English pages only
                  (translations/ and Sphinx's genindex / search / py-modindex pages left out)
  python-doc      python3.11-doc: the Python documentation's HTML pages (same index pages left out)
  postgresql-doc  postgresql-doc-15: the PostgreSQL manual's HTML pages (bookindex.html left out)
  perl-doc        perl-doc: the perl*.pod manual pages, as text by pod2text (a part of perl)
  gcide           dict-gcide: the Collaborative International Dictionary of English (Webster's
                  1913 and WordNet), its entries without the 00-database-* header and the
                  source tags ([1913 Webster], [PJC], ...), 100 consecutive entries a document

An HTML page and a pod file are one document each. Every source is a DFSG-free Debian
package (main); GCIDE is under the GPL (version 2 or later), the others under their
projects' own free licences (GPL-2 for the kernel's, PSF, PostgreSQL, Artistic/GPL for
Perl's): see /usr/share/doc/PACKAGE/copyright.

Writes OUT/sources/NAME.jsonl (one {"text": ...} line a document; a finished file is reused
on a rerun, so the packages are read once), then OUT/data: mom-prep's output, with a
byte-level BPE of --vocab tokens trained on the train split and --val-fraction of the
documents held out (whole documents, seed 2357); mom-prep leaves a finished OUT/data alone.
OUT/corpus.json records each source's package, its version, documents and characters.
--root-prefix DIR reads the packages' files under DIR instead of / (for tests).
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Callable, Iterator, Sequence

from data_prep.html_text import html_to_text
from mom_ds.files import replaced, write_text

VOCAB = 4096
VAL_FRACTION = 0.02
SEED = 2357
ENTRIES_PER_DOCUMENT = 100  # gcide: entries are a few lines; the val split needs bigger units

# Index pages of Sphinx (genindex*, search, py-modindex) and of PostgreSQL's DocBook
# (bookindex) are lists of links, and linux-doc's translations/ is not English.
SKIPPED = re.compile(r"/translations/|/(genindex(-[^/]*)?|search|py-modindex|bookindex)\.html$")

# A line that is only GCIDE source tags, as "[1913 Webster]" or "[Webster 1913 Suppl. + PJC]":
# boilerplate after every paragraph. Bracketed usage labels and etymologies ("[Obs.]",
# "[L. ablatio.]") are text and stay; so the tags are named, editors by their initials.
_TAG = r"(?:1913 Webster|Webster 1913 Suppl\.|WordNet(?: [\d.]+| sense \d+)?|Century Dict\.,? 1906\.?|PJC\.|[A-Z]{2,3})"
TAG_LINE = re.compile(rf"^[ \t]*\[\s*{_TAG}(?:\s*\+?\s*{_TAG})*\s*\][ \t]*\n?", re.MULTILINE)
_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@dataclass(frozen=True)
class Source:
    name: str  # for --sources, and the staged file OUT/sources/NAME.jsonl
    package: str  # the Debian package that installs the files
    installed: str  # a glob that matches a file of the package where it is installed
    files: str  # glob of the files read (** recursive), in path order
    read: Callable[[Path], Iterator[str]]  # one file -> its documents


def read_html(path: Path) -> Iterator[str]:
    yield html_to_text(path.read_text(encoding="utf-8", errors="replace"))


def read_pod(path: Path) -> Iterator[str]:
    # --utf8: without it pod2text writes Latin-1 for some pages (perlport, perlreapi, ...).
    done = subprocess.run(["pod2text", "--utf8", str(path)], capture_output=True, check=True)
    yield done.stdout.decode("utf-8", errors="replace")


def read_dictionary(path: Path) -> Iterator[str]:
    """A dictd dictionary (NAME.dict.dz beside NAME.index) in documents of ENTRIES_PER_DOCUMENT
    entries. The entries are the .index's byte ranges: blank lines also part the senses
    inside an entry, so they do not delimit entries."""
    data = gzip.decompress(path.read_bytes())  # dictzip is gzip with a random-access table
    index = path.with_name(path.name.removesuffix(".dict.dz") + ".index")
    rows = (line.rsplit("\t", 2) for line in index.read_text(encoding="utf-8", errors="replace").splitlines())
    spans = sorted({(_base64(offset), _base64(length)) for _, offset, length in rows})  # headwords share entries
    entries = [TAG_LINE.sub("", data[offset:offset + length].decode("utf-8", errors="replace")).strip()
               for offset, length in spans]
    entries = [entry for entry in entries if entry and not entry.startswith("00-database-")]
    for start in range(0, len(entries), ENTRIES_PER_DOCUMENT):
        yield "\n\n".join(entries[start:start + ENTRIES_PER_DOCUMENT])


def _base64(digits: str) -> int:
    """dictd's numbers: big-endian base-64 digits."""
    value = 0
    for digit in digits:
        value = value * 64 + _BASE64.index(digit)
    return value


SOURCES = (
    Source("linux-doc", "linux-doc-6.1", "/usr/share/doc/linux-doc-6.1/html",
           "/usr/share/doc/linux-doc-6.1/html/**/*.html", read_html),
    Source("python-doc", "python3.11-doc", "/usr/share/doc/python3.11/html",
           "/usr/share/doc/python3.11/html/**/*.html", read_html),
    Source("postgresql-doc", "postgresql-doc-15", "/usr/share/doc/postgresql-doc-15/html",
           "/usr/share/doc/postgresql-doc-15/html/*.html", read_html),
    # perl-modules also installs a few pods there (perldiag, ...): perlfunc is perl-doc's.
    Source("perl-doc", "perl-doc", "/usr/share/perl/5.*/pod/perlfunc.pod",
           "/usr/share/perl/5.*/pod/*.pod", read_pod),
    Source("gcide", "dict-gcide", "/usr/share/dictd/gcide.dict.dz",
           "/usr/share/dictd/gcide.dict.dz", read_dictionary),
)
NAMES = tuple(source.name for source in SOURCES)


def under(root: Path, pattern: str) -> str:
    return os.path.join(root, pattern.lstrip("/"))


def files(source: Source, root: Path) -> list[Path]:
    # Real paths: /usr/share/perl/5.36 is a link to 5.36.0, and a file is read once.
    paths = {os.path.realpath(p) for p in glob(under(root, source.files), recursive=True)}
    return [Path(p) for p in sorted(paths) if not SKIPPED.search(p)]


def stage(source: Source, path: Path, root: Path) -> None:
    """Write the source's documents to `path` whole or not at all (a killed run leaves no
    file that a rerun would take for finished)."""
    with replaced(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for file in files(source, root):
            for text in source.read(file):
                if text.strip():
                    f.write(json.dumps({"text": text.strip()}, ensure_ascii=False) + "\n")


def count(path: Path) -> tuple[int, int]:
    """Documents and characters of a staged file."""
    documents = characters = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            documents += 1
            characters += len(json.loads(line)["text"])
    return documents, characters


def package_version(package: str) -> str | None:
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    except FileNotFoundError:  # not a Debian system
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def check_installed(chosen: list[Source], staged: dict[str, Path], root: Path) -> None:
    """One error naming every package to install, before any work; a source already staged
    does not need its package."""
    missing = [s for s in chosen if not staged[s.name].exists() and not glob(under(root, s.installed))]
    if missing:
        what = "; ".join(f"no {under(root, s.installed)} (Debian package {s.package})" for s in missing)
        sys.exit(f"corpus: {what}. Fix: apt-get install {' '.join(s.package for s in missing)}, "
                 f"or --sources without {'it' if len(missing) == 1 else 'them'}.")


def prepare(out: Path, sources: Sequence[str] = NAMES, vocab: int = VOCAB, val_fraction: float = VAL_FRACTION,
            quiet: bool = False, root: Path = Path("/")) -> Path:
    """Stage the sources and run mom-prep on them; returns OUT/data. Exits (SystemExit, one
    message) when a package is missing or mom-prep fails."""
    from data_prep.cli import main as mom_prep

    unknown = sorted(set(sources) - set(NAMES))
    if unknown:
        sys.exit(f"corpus: unknown source(s) {', '.join(unknown)}; the sources are {', '.join(NAMES)}")
    say = (lambda line: None) if quiet else print
    chosen = [s for s in SOURCES if s.name in sources]  # the table's order: the same corpus for any order given
    staged = {s.name: out / "sources" / f"{s.name}.jsonl" for s in chosen}
    check_installed(chosen, staged, root)
    (out / "sources").mkdir(parents=True, exist_ok=True)
    record = {}
    for source in chosen:
        reused = staged[source.name].exists()
        if not reused:
            stage(source, staged[source.name], root)
        documents, characters = count(staged[source.name])
        version = package_version(source.package) if root == Path("/") else None  # a test's tree is no package
        record[source.name] = {"package": source.package, "version": version, "documents": documents,
                               "characters": characters}
        say(f"corpus: {source.name:<15} {documents:>9,} documents {characters:>13,} characters "
            f"({source.package}{f' {version}' if version else ''}{', staged before' if reused else ''})")

    data = out / "data"
    argv = ["--source", *map(str, staged.values()), "--train-tokenizer", str(vocab), "--val-fraction",
            str(val_fraction), "--seed", str(SEED), "--out", str(data), "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        code = mom_prep(argv)
    if code != 0:
        sys.exit(f"corpus: mom-prep failed (above). Where {data} was prepared from other --sources, "
                 f"--vocab or --val-fraction, or a staged file was remade since, remove {data} or "
                 f"choose another --out.")
    write_text(out / "corpus.json", json.dumps({"sources": record}, indent=2) + "\n")

    meta = json.loads((data / "meta.json").read_text())
    splits = meta["splits"]
    tokens = splits["train"]["n_tokens"] + splits["val"]["n_tokens"]
    characters = sum(r["characters"] for r in record.values())
    say(f"corpus: {data}: train {splits['train']['n_tokens']:,} tokens / {splits['train']['n_documents']:,} "
        f"documents, val {splits['val']['n_tokens']:,} tokens / {splits['val']['n_documents']:,} documents "
        f"({characters / tokens:.2f} characters per token); tokenizer: {meta['tokenizer']['spec']} "
        f"({data / meta['tokenizer']['file']})")
    return data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder: OUT/sources, OUT/data, OUT/corpus.json")
    p.add_argument("--sources", nargs="+", choices=NAMES, default=list(NAMES), metavar="NAME",
                   help=f"the sources to use (default: all: {' '.join(NAMES)})")
    p.add_argument("--vocab", type=int, default=VOCAB, help=f"tokens of the BPE trained (default {VOCAB})")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                   help=f"chance that a document is held out (default {VAL_FRACTION})")
    p.add_argument("--root-prefix", type=Path, default=Path("/"),
                   help="read the packages' files under this folder instead of / (for tests)")
    args = p.parse_args(argv)
    prepare(args.out, args.sources, args.vocab, args.val_fraction, root=args.root_prefix)


if __name__ == "__main__":
    main()
