"""bench/corpus.py on a fake tree of the five Debian packages: the pages, pods and dictionary
entries it must leave out stay out, the dictionary is cut into documents of 100 entries,
mom-prep's documents are the staged ones, a rerun reads nothing again, and a missing package
is one error."""
from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from mom_ds_testing.runs import REPO, run_python

import corpus

N_ENTRIES = 250  # gcide: documents of 100, 100 and 50 entries
HAVE_POD2TEXT = shutil.which("pod2text") is not None


def page(body: str) -> str:
    return (f"<html><head><script>navigate()</script></head><body>"
            f"<div class='sphinxsidebar'>SIDEBAR_TEXT</div><p>{body}</p></body></html>")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def base64(value: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = ""
    while True:
        value, digit = divmod(value, 64)
        digits = alphabet[digit] + digits
        if value == 0:
            return digits


def write_dictionary(directory: Path) -> None:
    """gcide.dict.dz (gzip) and gcide.index: a 00-database header entry, then N_ENTRIES entries
    of two senses (a blank line between them) with source tags, one indexed under two headwords."""
    entries = ["00-database-info\n   HEADER_TEXT of the database.\n"]
    for i in range(N_ENTRIES):
        entries.append(f"Word{i:03d} \\Word{i:03d}\\, n.\n   1. The first sense of word {i}.\n"
                       f"      [1913 Webster]\n\n   2. Another sense.\n      [Obs.]\n"
                       f"      [Webster 1913 Suppl. + PJC]\n")
    raw, rows, offset = b"", [], 0
    for entry in entries:
        data = entry.encode() + b"\n"
        rows.append((entry.split()[0], offset, len(data) - 1))
        raw, offset = raw + data, offset + len(data)
    rows.append(("Alias000", rows[1][1], rows[1][2]))  # a second headword of Word000
    directory.mkdir(parents=True)
    (directory / "gcide.dict.dz").write_bytes(gzip.compress(raw))
    (directory / "gcide.index").write_text(
        "".join(f"{word}\t{base64(o)}\t{base64(n)}\n" for word, o, n in sorted(rows)))


def write_tree(root: Path) -> None:
    linux = root / "usr/share/doc/linux-doc-6.1/html"
    write(linux / "index.html", page("The Linux kernel documentation, LINUX_INDEX."))
    write(linux / "admin-guide/README.html", page("How to configure the kernel, LINUX_ADMIN."))
    write(linux / "translations/zh_CN/index.html", page("TRANSLATED_TEXT"))
    write(linux / "genindex.html", page("GENINDEX_TEXT"))
    write(linux / "search.html", page("SEARCH_TEXT"))
    python = root / "usr/share/doc/python3.11/html"
    write(python / "library/os.html", page("Miscellaneous operating system interfaces, PYTHON_OS."))
    write(python / "genindex-A.html", page("GENINDEX_TEXT"))
    write(python / "py-modindex.html", page("MODINDEX_TEXT"))
    postgresql = root / "usr/share/doc/postgresql-doc-15/html"
    write(postgresql / "sql-select.html", page("SELECT retrieves rows, POSTGRESQL_SELECT."))
    write(postgresql / "bookindex.html", page("BOOKINDEX_TEXT"))
    pod = root / "usr/share/perl/5.36.0/pod"
    write(pod / "perlfunc.pod", "=head1 NAME\n\nperlfunc - Perl builtin functions, PERL_FUNC.\n\n=cut\n")
    write(pod / "perlintro.pod", "=head1 NAME\n\nperlintro - a brief introduction, PERL_INTRO.\n\n=cut\n")
    (root / "usr/share/perl/5.36").symlink_to("5.36.0")  # as Debian's: each pod is read once
    write_dictionary(root / "usr/share/dictd")


SOURCES = [name for name in corpus.NAMES if name != "perl-doc" or HAVE_POD2TEXT]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """OUT of one prepare over the fake tree (perl-doc only where pod2text is)."""
    root = tmp_path_factory.mktemp("root")
    write_tree(root)
    out = tmp_path_factory.mktemp("out")
    assert corpus.prepare(out, SOURCES, vocab=300, val_fraction=0.2, root=root) == out / "data"
    return out


def staged(out: Path, name: str) -> list[str]:
    lines = (out / "sources" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def test_html_pages_leave_out_translations_index_pages_and_navigation(prepared):
    texts = {name: staged(prepared, name) for name in ("linux-doc", "python-doc", "postgresql-doc")}
    assert len(texts["linux-doc"]) == 2 and len(texts["python-doc"]) == 1 and len(texts["postgresql-doc"]) == 1
    everything = "\n".join(t for docs in texts.values() for t in docs)
    for marker in ("LINUX_INDEX", "LINUX_ADMIN", "PYTHON_OS", "POSTGRESQL_SELECT"):
        assert marker in everything
    for marker in ("TRANSLATED_TEXT", "GENINDEX_TEXT", "SEARCH_TEXT", "MODINDEX_TEXT", "BOOKINDEX_TEXT",
                   "SIDEBAR_TEXT", "navigate()"):
        assert marker not in everything


@pytest.mark.skipif(not HAVE_POD2TEXT, reason="pod2text (Debian package perl) is not on PATH")
def test_pods_are_text_each_read_once(prepared):
    texts = staged(prepared, "perl-doc")
    assert len(texts) == 2  # 5.36 links to 5.36.0
    assert "PERL_FUNC" in texts[0] and "PERL_INTRO" in texts[1]
    assert not any("=head1" in t for t in texts)


def test_dictionary_documents_hold_100_entries_without_header_and_source_tags(prepared):
    texts = staged(prepared, "gcide")
    headwords = [re.findall(r"^Word(\d{3}) ", t, flags=re.MULTILINE) for t in texts]
    assert [len(h) for h in headwords] == [100, 100, N_ENTRIES - 200]
    assert [int(i) for h in headwords for i in h] == list(range(N_ENTRIES))  # in order, each once
    everything = "\n".join(texts)
    assert everything.count("Another sense.") == N_ENTRIES  # both senses of an entry kept
    assert everything.count("[Obs.]") == N_ENTRIES  # a usage label is text
    assert "HEADER_TEXT" not in everything and "00-database" not in everything
    assert "Webster" not in everything and "PJC" not in everything


def test_mom_prep_documents_are_the_staged_ones_and_corpus_json_counts_them(prepared):
    meta = json.loads((prepared / "data" / "meta.json").read_text())
    splits = meta["splits"]
    record = json.loads((prepared / "corpus.json").read_text())["sources"]
    assert list(record) == SOURCES
    documents = {name: staged(prepared, name) for name in SOURCES}
    for name, texts in documents.items():
        assert record[name]["documents"] == len(texts)
        assert record[name]["characters"] == sum(len(t) for t in texts)
        assert record[name]["version"] is None  # a fake tree is no installed package
    assert splits["train"]["n_documents"] + splits["val"]["n_documents"] == sum(map(len, documents.values()))
    assert splits["val"]["n_documents"] >= 1
    assert meta["tokenizer"]["vocab_size"] == 300


def test_second_call_reuses_staged_files_and_mom_prep_output(tmp_path):
    write_tree(tmp_path / "root")
    out = tmp_path / "out"
    sources = ["python-doc", "gcide"]
    corpus.prepare(out, sources, vocab=300, val_fraction=0.2, quiet=True, root=tmp_path / "root")
    written = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "corpus.json")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in written}
    shutil.rmtree(tmp_path / "root")  # nothing is read from the packages again
    corpus.prepare(out, sources, vocab=300, val_fraction=0.2, quiet=True, root=tmp_path / "root")
    assert sorted(p for p in out.rglob("*") if p.is_file() and p.name != "corpus.json") == written
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in written} == before


def test_missing_packages_are_one_error_before_any_work(tmp_path):
    proc = run_python([str(REPO / "bench" / "corpus.py"), "--out", str(tmp_path / "out"), "--root-prefix",
                       str(tmp_path / "empty"), "--sources", "gcide", "linux-doc"], timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip()
    assert error.startswith("corpus: no ") and "(Debian package linux-doc-6.1)" in error
    assert "(Debian package dict-gcide)" in error
    assert "Fix: apt-get install linux-doc-6.1 dict-gcide, or --sources without them." in error
    assert not (tmp_path / "out").exists()
