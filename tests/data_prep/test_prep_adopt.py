"""mom-prep adopt: token files written as nanoGPT or Megatron write them get the meta.json
mom-prep writes for the same tokens (mom-prep's own output of the same text is the
reference), train as mom-prep's output does, and bad files are refused in one line. And
model.vocab_size, left unset, comes from the data padded up to a multiple of 64."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main as mom_prep
from mom_ds.config import ConfigError, load_run_config
from mom_ds.train.run_data import data_fingerprint
from test_prep_gpt2 import nanogpt_reference, reference_encoding, stdlib_docstrings, write_jsonl  # noqa: F401
from mom_ds_testing.runs import TINY, metrics, mom_train, tiny_args

# what mom-prep adopt cannot know about files another tool split and wrote
PROVENANCE = {"created_by", "source", "split", "settings", "source_fingerprint"}
SEED, VAL_FRACTION = 2357, 0.05


def meta(directory: Path) -> dict:
    return json.loads((directory / "meta.json").read_text())


def prepared(tmp_path: Path, docs: list[str], tokenizer: str, *extra: str) -> Path:
    """The reference: mom-prep's output for `docs`."""
    out = tmp_path / "mom-prep"
    assert mom_prep(["--source", str(write_jsonl(tmp_path / "corpus.jsonl", docs)), "--tokenizer", tokenizer,
                     "--out", str(out), "--val-fraction", str(VAL_FRACTION), "--seed", str(SEED),
                     "--num-proc", "1", "--quiet", *extra]) == 0
    return out


def split_docs(docs: list[str]) -> dict[str, list[str]]:
    """train / val as meta.json's split method states it (one draw per document, in order)."""
    to_val = np.random.default_rng(SEED).random(len(docs)) < VAL_FRACTION
    assert to_val.any() and not to_val.all()
    return {"train": [d for d, v in zip(docs, to_val) if not v], "val": [d for d, v in zip(docs, to_val) if v]}


def byte_tokens(docs: list[str], dtype: str) -> bytes:
    """What a nanoGPT-style prepare.py writes with a byte tokenizer: UTF-8 bytes, then end-of-text 256."""
    return np.array([i for d in docs for i in [*d.encode(), 256]], dtype=dtype).tobytes()


def adopt(directory: Path, *args: str) -> int:
    return mom_prep(["adopt", str(directory), "--quiet", *args])


def assert_same_meta(adopted: Path, reference: Path) -> None:
    got, want = meta(adopted), meta(reference)
    assert {k: v for k, v in got.items() if k not in PROVENANCE} == \
           {k: v for k, v in want.items() if k not in PROVENANCE}
    assert list(got) == [k for k in want if k != "source_fingerprint"]  # same schema, same order
    assert got["created_by"] == "mom-prep adopt"
    assert data_fingerprint(adopted) == data_fingerprint(reference)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_nanogpt_files_get_mom_preps_meta(tmp_path, dtype):
    """The dtype is found from the ids (uint32 files of byte ids read as valid uint16 too:
    the end-of-text ending tells them apart), the documents from end-of-text."""
    docs = stdlib_docstrings(120)
    reference = prepared(tmp_path, docs, "bytes", "--dtype", dtype)
    nanogpt = tmp_path / "nanogpt"
    nanogpt.mkdir()
    for split, part in split_docs(docs).items():
        (nanogpt / f"{split}.bin").write_bytes(byte_tokens(part, dtype))
    assert adopt(nanogpt, "--tokenizer", "bytes") == 0
    assert_same_meta(nanogpt, reference)
    assert meta(nanogpt)["dtype"] == dtype


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_megatron_files_get_mom_preps_meta(tmp_path, dtype):
    """The dtype and the document count come from the .idx (int32, code 4, read as uint32)."""
    reference = prepared(tmp_path, stdlib_docstrings(60), "bytes", "--dtype", dtype, "--megatron-idx")
    megatron = tmp_path / "megatron"
    megatron.mkdir()
    for name in ("train.bin", "train.idx", "val.bin", "val.idx"):
        shutil.copyfile(reference / name, megatron / name)
    assert adopt(megatron, "--tokenizer", "bytes") == 0
    assert_same_meta(megatron, reference)
    assert meta(megatron)["splits"]["train"]["idx"] == "train.idx"


def test_megatron_files_that_disagree_are_refused(tmp_path, capsys):
    reference = prepared(tmp_path, stdlib_docstrings(60), "bytes", "--megatron-idx")
    (reference / "meta.json").unlink()
    err = refused(capsys, reference, "--tokenizer", "bytes", "--dtype", "uint32")
    assert "the dtypes disagree: train.idx says uint16, val.idx says uint16, --dtype says uint32" in err
    with open(reference / "val.bin", "ab") as f:
        f.write(b"\0\0")
    err = refused(capsys, reference, "--tokenizer", "bytes")
    assert f"{reference / 'val.bin'} holds " in err and "not one dataset's .idx and .bin" in err


@pytest.mark.slow
def test_adopted_gpt2_files_train_as_mom_preps(reference_encoding, tmp_path):  # noqa: F811
    """nanoGPT's own writer (tests/data_prep/test_prep_gpt2.py) and GPT-2 BPE: the same meta.json, and
    a run on each directory gives the same losses; model.vocab_size left unset becomes 50304."""
    encoding, directory = reference_encoding
    docs = stdlib_docstrings(300)
    reference = prepared(tmp_path, docs, f"gpt2:{directory}")
    nanogpt = tmp_path / "nanogpt"
    nanogpt.mkdir()
    for split, part in split_docs(docs).items():
        (nanogpt / f"{split}.bin").write_bytes(nanogpt_reference(encoding, part))
    assert adopt(nanogpt, "--tokenizer", f"gpt2:{directory}") == 0
    assert_same_meta(nanogpt, reference)

    recipe = tmp_path / "no-vocab.yaml"
    recipe.write_text("".join(line for line in TINY.read_text().splitlines(keepends=True)
                              if "vocab_size" not in line))
    losses = []
    for data in (reference, nanogpt):
        args = tiny_args(data, tmp_path / f"run-{data.name}")
        args[args.index("--config") + 1] = str(recipe)
        proc = mom_train(*args)
        assert f"model.vocab_size = 50304: the tokenizer of {data} has 50257 tokens, padded up to a " \
               f"multiple of 64" in proc.stdout
        rows = metrics(tmp_path / f"run-{data.name}")
        losses.append([(step, row.get("train/loss"), row.get("eval/loss")) for step, row in sorted(rows.items())])
    assert losses[0] == losses[1] and len(losses[0]) == 12


@pytest.fixture
def byte_files(tmp_path) -> Path:
    """Valid nanoGPT-style byte-token files, uint16, no meta.json."""
    directory = tmp_path / "d"
    directory.mkdir()
    for split, part in split_docs(stdlib_docstrings(60)).items():
        (directory / f"{split}.bin").write_bytes(byte_tokens(part, "uint16"))
    return directory


def refused(capsys, directory: Path, *args: str) -> str:
    assert adopt(directory, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mom-prep adopt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (directory / "meta.json").exists() or "already exists" in err
    return err


def test_a_wrong_dtype_is_refused(byte_files, capsys):
    """uint16 files named uint32: by their size, or (a whole number of uint32) by their ids."""
    sizes = {path: path.stat().st_size for path in byte_files.glob("*.bin")}
    assert any(size % 4 for size in sizes.values())
    err = refused(capsys, byte_files, "--tokenizer", "bytes", "--dtype", "uint32")
    assert "not a whole number of uint32 tokens (the dtype --dtype names)" in err
    for path, size in sizes.items():
        if size % 4:
            with open(path, "ab") as f:
                f.write(np.array([256], dtype="<u2").tobytes())
    err = refused(capsys, byte_files, "--tokenizer", "bytes", "--dtype", "uint32")
    assert "beyond the 257 tokens of tokenizer 'bytes' (largest: " in err and " as uint32)" in err
    assert "and the right --dtype" in err


def test_an_id_beyond_the_vocabulary_is_refused(byte_files, capsys):
    with open(byte_files / "val.bin", "ab") as f:
        f.write(np.array([300, 256], dtype="<u2").tobytes())
    err = refused(capsys, byte_files, "--tokenizer", "bytes")
    assert "beyond the 257 tokens of tokenizer 'bytes' (largest: 300 as uint16" in err and "--tokenizer" in err


def test_ambiguous_files_ask_for_the_dtype(byte_files, capsys):
    """Small ids as uint32, not ending with end-of-text: both readings are valid."""
    for split in ("train", "val"):
        (byte_files / f"{split}.bin").write_bytes(np.array([256, 65, 66], dtype="<u4").tobytes())
    err = refused(capsys, byte_files, "--tokenizer", "bytes")
    assert "both as uint16 and as uint32" in err and "pass --dtype uint16" in err
    assert adopt(byte_files, "--tokenizer", "bytes", "--dtype", "uint32") == 0
    assert meta(byte_files)["splits"]["val"] | {"sha256": None} == {
        "file": "val.bin", "n_tokens": 3, "n_documents": 2, "sha256": None, "idx": None, "max_token_id": 256}


def test_an_existing_meta_is_kept_unless_forced(byte_files, capsys):
    assert adopt(byte_files, "--tokenizer", "bytes") == 0
    before = (byte_files / "meta.json").read_text()
    err = refused(capsys, byte_files, "--tokenizer", "bytes")
    assert "meta.json already exists" in err and "--force" in err
    assert adopt(byte_files, "--tokenizer", "bytes", "--force") == 0
    assert (byte_files / "meta.json").read_text() == before


def test_empty_missing_and_non_token_files_are_refused(byte_files, capsys):
    (byte_files / "val.bin").write_bytes(b"")
    assert "val.bin is empty: not a token file" in refused(capsys, byte_files, "--tokenizer", "bytes")
    (byte_files / "val.bin").write_bytes(b"abc")
    err = refused(capsys, byte_files, "--tokenizer", "bytes")
    assert "val.bin is 3 bytes, not a whole number of uint16 or uint32 tokens: not a token file" in err
    (byte_files / "val.bin").write_bytes(b"plain text, no token file\n")
    err = refused(capsys, byte_files, "--tokenizer", "bytes")
    assert "beyond the 257 tokens" in err  # text read as uint16 ids: far beyond 256
    (byte_files / "val.bin").unlink()
    err = refused(capsys, byte_files, "--tokenizer", "bytes")
    assert "has no val.bin (it holds ['train.bin'])" in err and "symlink" in err


def test_a_nanogpt_file_without_end_of_text_is_refused(byte_files, capsys):
    (byte_files / "val.bin").write_bytes(np.array([65, 66, 67], dtype="<u2").tobytes())
    err = refused(capsys, byte_files, "--tokenizer", "bytes")
    assert "holds no end-of-text token (id 256 of 'bytes')" in err and "--tokenizer" in err


# --- model.vocab_size from the data -----------------------------------------------------------
@pytest.fixture
def adopted(byte_files) -> Path:
    assert adopt(byte_files, "--tokenizer", "bytes") == 0
    return byte_files


def test_vocab_size_left_unset_comes_from_the_data_padded(adopted, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  d_model: 64\n  n_heads: 4\n  n_positions: 128\ndata:\n  seq_len: 64\n")
    run = load_run_config(recipe, ["--data.data_dir", str(adopted)])
    assert run.model.vocab_size == 320  # 257 up to the next multiple of 64
    assert capsys.readouterr().out == f"model.vocab_size = 320: the tokenizer of {adopted} has 257 tokens, " \
                                      f"padded up to a multiple of 64 (set model.vocab_size to choose)\n"
    preset = tmp_path / "p.yaml"
    preset.write_text("preset: vanilla\npreset_args: {n_layer: 1, d_model: 64, n_heads: 4}\n")
    assert load_run_config(preset, ["--data.data_dir", str(adopted)]).model.vocab_size == 320
    assert "model.vocab_size = 320" in capsys.readouterr().out
    # set anywhere, it is kept as set
    assert load_run_config(TINY, ["--data.data_dir", str(adopted)]).model.vocab_size == 257
    assert load_run_config(recipe, ["--data.data_dir", str(adopted), "--model.vocab_size", "300"]
                           ).model.vocab_size == 300
    assert "model.vocab_size =" not in capsys.readouterr().out


def test_an_explicit_vocab_size_below_the_data_is_an_error(adopted):
    from mom_ds.train.preflight import check_data

    run = load_run_config(TINY, ["--data.data_dir", str(adopted), "--model.vocab_size", "200"])
    with pytest.raises(ConfigError, match="uses a vocabulary of 257 tokens but model.vocab_size = 200. "
                                          "Fix: set model.vocab_size >= 257"):
        check_data(run, world_size=1)
