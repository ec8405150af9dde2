"""Bad input: one clear DataError each, and nothing left at --out; atomic, idempotent output."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from data_prep import cli
from data_prep.format import DataError
from data_prep.pipeline import PrepSettings, prepare


def run(tmp_path, source, **settings):
    return prepare(PrepSettings(source=[str(source)], **{"tokenizer": "bytes", **settings}), tmp_path / "out",
                   show_progress=False)


def assert_no_output(tmp_path):
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        run(tmp_path, tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="no files match"):
        run(tmp_path, tmp_path / "*.txt")
    assert_no_output(tmp_path)


def test_empty_corpus(tmp_path):
    with pytest.raises(DataError, match="corpus is empty.*no documents"):
        run(tmp_path, jsonl(tmp_path / "none.jsonl", []))
    with pytest.raises(DataError, match="only empty or whitespace documents"):
        run(tmp_path, jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": " \n\t"}]))
    assert_no_output(tmp_path)


def test_non_utf8_fails_by_default_and_replace_is_opt_in(tmp_path):
    good = "fine text\n" * 3
    (tmp_path / "bad.txt").write_bytes(good.encode() + b"caf\xe9\n")
    with pytest.raises(DataError, match=f"bad.txt: bytes that are not UTF-8 at byte offset {len(good) + 3}.*"
                                        f"--encoding-errors replace"):
        run(tmp_path, tmp_path / "bad.txt")
    assert_no_output(tmp_path)
    run(tmp_path, tmp_path / "bad.txt", val_fraction=0.0,
        source_options=cli.SourceOptions(encoding_errors="replace"))
    text = (tmp_path / "out" / "train.bin").read_bytes()
    assert np.frombuffer(text, "<u2")[:-1].astype(np.uint8).tobytes().decode() == good + "caf\ufffd\n"


def test_missing_text_field(tmp_path):
    with pytest.raises(DataError, match=r"a.jsonl:2: no text field 'text' \(found \['body'\]\); pass --text-field"):
        run(tmp_path, jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"body": "y"}]))
    assert_no_output(tmp_path)


def test_vocab_too_large_for_forced_uint16(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"<unk>": 70_000, "<|endoftext|>": 70_001}
    big = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    big.pre_tokenizer = pre_tokenizers.Whitespace()
    big.save(str(tmp_path / "big.json"))
    corpus = jsonl(tmp_path / "c.jsonl", [{"text": "w1 w69999 Hello world"}] * 3)
    with pytest.raises(DataError, match="70002 tokens does not fit uint16"):
        run(tmp_path, corpus, tokenizer=str(tmp_path / "big.json"), dtype="uint16")
    assert_no_output(tmp_path)
    result = run(tmp_path, corpus, tokenizer=str(tmp_path / "big.json"), val_fraction=0.0)
    assert result.meta["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "out" / "train.bin", "<u4")[:2].tolist() == [1, 69_999]


def test_unknown_tokenizer_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="unknown tokenizer 'no-such-tokenizer-xyz'"):
        run(tmp_path, corpus, tokenizer="no-such-tokenizer-xyz")
    assert_no_output(tmp_path)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("flag,name,message", [
    ("--tokenizer", "nosuchorg/nosuchtok", "unknown tokenizer 'nosuchorg/nosuchtok'"),
    ("--source", "nosuchorg/nosuchds", "cannot load the Hugging Face dataset 'nosuchorg/nosuchds'"),
])
def test_unreachable_hub_is_not_retried(tmp_path, flag, name, message):
    # Without HF_HUB_OFFLINE the hub clients retry with back-off for 25-54 s before failing;
    # the probe says at once that the (here: local, closed) endpoint cannot be reached.
    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    args = {"--source": str(tmp_path / "c.jsonl"), "--tokenizer": "bytes", flag: name}
    proc = subprocess.run([sys.executable, "-m", "data_prep.cli", *(x for kv in args.items() for x in kv),
                           "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and f"127.0.0.1:{port} cannot be reached" in proc.stderr
    assert "Retrying" not in proc.stderr and "Traceback" not in proc.stderr
    assert_no_output(tmp_path)


def test_reachable_hub_is_asked(monkeypatch):
    from data_prep import hub

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        hub.hub_unreachable.cache_clear()
        try:
            assert hub.hub_unreachable() is None and not hub.cache_only()
        finally:
            hub.hub_unreachable.cache_clear()


def test_gpt2_offline_names_the_fix(tmp_path, monkeypatch, shared_gpt2_tokenizer_dir):
    import tiktoken

    from data_prep.tokenizer import GPT2_ENV, load_tokenizer

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.delenv(GPT2_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="--tokenizer gpt2:/path/to/dir or set MOM_GPT2_DIR"):
        load_tokenizer("gpt2")
    monkeypatch.setenv(GPT2_ENV, str(shared_gpt2_tokenizer_dir))
    assert load_tokenizer("gpt2").encode("Hello world").tolist() == [15496, 995]
    with pytest.raises(DataError, match="must hold GPT-2's vocab.json and merges.txt"):
        load_tokenizer(f"gpt2:{tmp_path}")


def test_interrupted_run_leaves_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("good " * 100_000)  # several batches before the failure
    (tmp_path / "in" / "b.txt").write_bytes(b"\xff")
    with pytest.raises(DataError, match="not UTF-8"):
        run(tmp_path, tmp_path / "in")
    assert_no_output(tmp_path)


def test_rerun_is_a_noop_and_overwrite_replaces(tmp_path):
    corpus = jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    first = run(tmp_path, corpus)
    stamp = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    again = run(tmp_path, corpus)
    assert again.skipped and again.meta == first.meta
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="different settings.*--overwrite"):
        run(tmp_path, corpus, seed=1)
    replaced = prepare(PrepSettings(source=[str(corpus)], tokenizer="bytes", seed=1), tmp_path / "out",
                       overwrite=True, show_progress=False)
    assert not replaced.skipped and replaced.meta["split"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]


def test_never_deletes_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    corpus = jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="not a mom-prep output"):
        prepare(PrepSettings(source=[str(corpus)], tokenizer="bytes"), tmp_path / "out", overwrite=True,
                show_progress=False)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert cli.main(["--source", str(tmp_path / "absent.txt"), "--tokenizer", "bytes", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mom-prep: error:") and "no such file" in err and "Traceback" not in err
    jsonl(tmp_path / "c.jsonl", [{"text": "hello"}] * 4)
    argv = ["--source", str(tmp_path / "c.jsonl"), "--tokenizer", "bytes", "--out", str(tmp_path / "o"), "--quiet"]
    assert cli.main(argv) == 0 and "wrote" in capsys.readouterr().out
    assert cli.main(argv) == 0 and "nothing to do" in capsys.readouterr().out
