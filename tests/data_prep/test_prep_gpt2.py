"""GPT-2 path: byte-identical to a nanoGPT-style reference; round trip on real text; worker-count invariance."""
import ast
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from data_prep.pipeline import PrepSettings, prepare
from data_prep.tokenizer import load_tokenizer

SAMPLES = ["Hello world", "", " leading space", "trailing newlines\n\n\n", "tabs\tand\r\nCRLF",
           "naïve café – “quotes” — 東京 🚀 emoji 👩‍👩‍👧", "it's we'll they've I'M", "<|endoftext|> as plain text",
           "x" * 5000, "1234567890 3.14159 0x1F"]


def stdlib_docstrings(limit: int) -> list[str]:
    """English text on every machine: docstrings of the standard library's modules."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text("utf-8")))
        if doc:
            docs.append(doc)
        if len(docs) == limit:
            break
    return docs


@pytest.fixture
def reference_encoding(shared_gpt2_tokenizer_dir):
    directory = shared_gpt2_tokenizer_dir
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(directory / "merges.txt"),
                                            encoder_json_file=str(directory / "vocab.json"))
    # GPT-2's split pattern, as published with the model (tiktoken_ext.openai_public r50k).
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding("gpt2-ref", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}), directory


def nanogpt_reference(encoding, docs: list[str]) -> bytes:
    """What nanoGPT's prepare.py writes: encode_ordinary + EOT per document, concatenated, uint16."""
    ids = []
    for doc in docs:
        ids.extend(encoding.encode_ordinary(doc))
        ids.append(encoding.eot_token)
    return np.array(ids, dtype="<u2").tobytes()


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def test_hello_world_and_round_trip_on_real_text(reference_encoding):
    encoding, directory = reference_encoding
    tok = load_tokenizer(f"gpt2:{directory}")
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert (tok.info.vocab_size, tok.info.eot_id) == (50257, 50256)
    for text in SAMPLES + stdlib_docstrings(40):
        ids = tok.encode(text)
        assert ids.tolist() == encoding.encode_ordinary(text)
        assert tok.decode(ids) == text


@pytest.mark.parametrize("num_proc", [1, 2])
def test_bin_is_byte_identical_to_nanogpt_reference(reference_encoding, tmp_path, num_proc):
    encoding, directory = reference_encoding
    docs = SAMPLES + stdlib_docstrings(200)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    prepare(PrepSettings(source=[str(corpus)], tokenizer=f"gpt2:{directory}", val_fraction=0.0),
            tmp_path / "out", num_proc=num_proc, show_progress=False)
    assert (tmp_path / "out" / "train.bin").read_bytes() == nanogpt_reference(encoding, docs)
    assert (tmp_path / "out" / "val.bin").read_bytes() == b""


def test_split_follows_the_documented_rule(reference_encoding, tmp_path):
    encoding, directory = reference_encoding
    docs = stdlib_docstrings(150)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs)
    result = prepare(PrepSettings(source=[str(corpus)], tokenizer=f"gpt2:{directory}", val_fraction=0.1, seed=11),
                     tmp_path / "out", num_proc=2, show_progress=False)
    to_val = np.random.default_rng(11).random(len(docs)) < 0.1
    assert 0 < to_val.sum() < len(docs)
    out = tmp_path / "out"
    assert (out / "train.bin").read_bytes() == nanogpt_reference(encoding, [d for d, v in zip(docs, to_val) if not v])
    assert (out / "val.bin").read_bytes() == nanogpt_reference(encoding, [d for d, v in zip(docs, to_val) if v])
    assert result.meta["splits"]["val"]["n_documents"] == to_val.sum()
    assert result.meta["tokenizer"] == {"spec": f"gpt2:{directory}", "kind": "tiktoken",
                                        "vocab_size": 50257, "eot_id": 50256}
