"""Every source kind yields the documents it should, in order; bytes tokenizer round trip."""
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.pipeline import PrepSettings, prepare
from data_prep.sources import SourceOptions, resolve_source
from data_prep.tokenizer import load_tokenizer
from mom_ds.data import load_data_tokenizer

DOCS = ["first document\nwith two lines", "second: ünïcödé ✓", "third"]


def docs_of(specs, **options):
    return list(resolve_source([str(s) for s in specs], SourceOptions(**options)).documents())


def test_txt_one_document_per_file_and_blank_line_mode(tmp_path):
    for i, doc in enumerate(DOCS):
        (tmp_path / f"{i}.txt").write_text(doc, encoding="utf-8")
    assert docs_of([tmp_path]) == DOCS  # a folder: files in sorted order
    assert docs_of([tmp_path / "*.txt"]) == DOCS  # a glob
    (tmp_path / "all.txt").write_text("\n\n".join(DOCS) + "\n\n\n", encoding="utf-8")
    assert docs_of([tmp_path / "all.txt"], txt_mode="blank-line") == DOCS


def test_jsonl_json_and_parquet_with_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"body": d, "id": i} for i, d in enumerate(DOCS)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(records))
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "c.parquet")
    for name in ("a.jsonl", "b.json", "c.parquet"):
        assert docs_of([tmp_path / name], text_field="body") == DOCS
    assert docs_of([tmp_path / "a.jsonl", tmp_path / "c.parquet"], text_field="body") == DOCS * 2


def test_saved_dataset_directory(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "ds"))
    assert docs_of([tmp_path / "ds"]) == DOCS
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS[:1]})}).save_to_disk(str(tmp_path / "dd"))
    assert docs_of([tmp_path / "dd"]) == DOCS[:1]


def test_builtin_corpus_is_the_stdlib():
    source = resolve_source(["builtin"], SourceOptions())
    assert "standard library" in source.description and len(source.files) > 100
    assert not any("test" in p.parts for p in source.files)
    first = next(iter(source.documents()))
    assert first == source.files[0].read_text("utf-8")


def test_bytes_round_trip_and_prepared_files(tmp_path):
    tok = load_tokenizer("bytes")
    for text in DOCS + ["", "\x00\xff", "🚀" * 3]:
        assert tok.decode(tok.encode(text)) == text
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    prepare(PrepSettings(source=[str(tmp_path / "c.jsonl")], tokenizer="bytes", val_fraction=0.0),
            tmp_path / "out", show_progress=False)
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype="<u2")
    assert load_data_tokenizer(tmp_path / "out").decode(ids) == "<|endoftext|>".join(DOCS) + "<|endoftext|>"


def test_train_tokenizer_is_saved_beside_the_data(tmp_path):
    text = Path(__file__).read_text()
    (tmp_path / "c.txt").write_text(text)
    result = prepare(PrepSettings(source=[str(tmp_path / "c.txt")], train_tokenizer=300, val_fraction=0.0),
                     tmp_path / "out", show_progress=False)
    assert result.meta["tokenizer"]["vocab_size"] == 300 and result.meta["tokenizer"]["file"] == "tokenizer.json"
    tok = load_data_tokenizer(tmp_path / "out")
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype="<u2")
    assert ids[-1] == tok.info.eot_id and len(ids) < 0.8 * len(text.encode())  # merges learned
    assert tok.decode(ids[:-1]) == text
    sample = "naïve 🚀 text never seen in training"
    assert tok.decode(tok.encode(sample)) == sample


def test_trained_tokenizer_never_sees_the_val_documents(tmp_path):
    """A word repeated in every held-out document only, another in the train ones: BPE
    merges the second into one token and never sees the first. Which documents are held out
    is computed here from the documented draw (numpy's default_rng(seed).random(), one per
    document in source order, val when below the fraction)."""
    held_out = np.random.default_rng(7).random(40) < 0.3
    assert 0 < held_out.sum() < 40
    docs = [f"document {i}: " + " ".join(["quokkamango" if val else "zebrafoxtrot"] * 30)
            for i, val in enumerate(held_out)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = prepare(PrepSettings(source=[str(tmp_path / "c.jsonl")], train_tokenizer=300,
                                  val_fraction=0.3, seed=7), tmp_path / "out", show_progress=False)
    tok = load_data_tokenizer(tmp_path / "out")
    val = tok.decode(np.fromfile(tmp_path / "out" / "val.bin", dtype="<u2"))
    assert val.split("<|endoftext|>")[:-1] == [d for d, v in zip(docs, held_out) if v]
    assert len(tok.encode(" zebrafoxtrot")) == 1
    assert len(tok.encode(" quokkamango")) > 3
    assert "trained on the train split" in result.meta["tokenizer"]["spec"]


def test_trained_tokenizer_skips_the_last_document_when_it_is_given_to_val(tmp_path):
    """No document drew val, so mom-prep gives the last one to val: the tokenizer must not
    have seen it either."""
    docs = [f"doc {i}: " + " ".join(["zebrafoxtrot"] * 30) for i in range(4)]
    docs.append("last: " + " ".join(["quokkamango"] * 30))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    result = prepare(PrepSettings(source=[str(tmp_path / "c.jsonl")], train_tokenizer=300,
                                  val_fraction=1e-9), tmp_path / "out", show_progress=False)
    assert result.meta["splits"]["val"]["n_documents"] == 1
    tok = load_data_tokenizer(tmp_path / "out")
    assert tok.decode(np.fromfile(tmp_path / "out" / "val.bin", dtype="<u2")) == docs[-1] + "<|endoftext|>"
    assert len(tok.encode(" zebrafoxtrot")) == 1 and len(tok.encode(" quokkamango")) > 3


def test_hub_name_offline_is_one_clear_error(tmp_path, monkeypatch):
    from data_prep.format import DataError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load 'no-such/dataset-xyz'"):
        resolve_source(["no-such/dataset-xyz"], SourceOptions())


def test_val_gets_the_last_document_when_the_draw_gives_none(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    result = prepare(PrepSettings(source=[str(tmp_path / "c.jsonl")], tokenizer="bytes", val_fraction=1e-9),
                     tmp_path / "out", show_progress=False)
    assert result.meta["splits"]["val"]["n_documents"] == 1
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype="<u2")
    assert bytes(val[:-1].astype(np.uint8)) == b"doc 4"


PAGE = """<!DOCTYPE html>
<html><head><title>json</title><style>body { color: red }</style>
<script>var nav = "not text";</script></head>
<body>
<div class="related" role="navigation"><ul><li><a href="index.html">index</a></li></ul></div>
<nav>Table of contents</nav>
<div role="navigation"><ul class="wy-breadcrumbs"><li>Docs &raquo;</li><li>View page source</li></ul></div>
<div class="navheader"><table><tr><td>Prev</td><td>Up</td><td>Next</td></tr></table></div>
<div class="body">
<h1>json &mdash; JSON encoder<a class="headerlink" href="#json">&para;</a></h1>
<p>JSON is a <em>lightweight</em>
   data interchange   format.</p>
<pre>&gt;&gt;&gt; import json
&gt;&gt;&gt; json.dumps([1, 2])
'[1, 2]'
</pre>
<ul><li>dumps</li><li>loads &amp; load</li></ul>
</div>
<div class="rst-footer-buttons"><a>Previous</a><a>Next</a></div>
<div class="navfooter">Prev Home Next</div>
<div class="sphinxsidebar">Quick search</div>
<footer>&copy; Copyright</footer>
</body></html>
"""
PAGE_TEXT = ("json \u2014 JSON encoder\n\n"
             "JSON is a lightweight data interchange format.\n\n"
             ">>> import json\n>>> json.dumps([1, 2])\n'[1, 2]'\n\n"
             "dumps\n\n"
             "loads & load")


def test_html_page_is_one_document_of_its_readable_text(tmp_path):
    (tmp_path / "a.html").write_text(PAGE, encoding="utf-8")
    (tmp_path / "b.htm").write_text("<p>second page</p>", encoding="utf-8")
    (tmp_path / "empty.html").write_text("<script>only code</script>", encoding="utf-8")
    assert docs_of([tmp_path]) == [PAGE_TEXT, "second page"]  # a page without text is skipped


def test_html_round_trip_through_mom_prep(tmp_path):
    from data_prep.cli import main as mom_prep

    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "a.html").write_text(PAGE, encoding="utf-8")
    assert mom_prep(["--source", str(tmp_path / "pages" / "*.html"), "--tokenizer", "bytes",
                     "--val-fraction", "0", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype="<u2")
    assert load_data_tokenizer(tmp_path / "out").decode(ids) == PAGE_TEXT + "<|endoftext|>"
