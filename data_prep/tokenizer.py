"""Tokenizers behind one small interface: encode a batch of documents into one id stream.

Specs accepted by `load_tokenizer` (the `--tokenizer` flag):
  bytes             256 byte values + end-of-text 256 (vocab 257); needs no files
  gpt2              tiktoken's GPT-2 BPE (nanoGPT's); offline, set MOM_GPT2_DIR or use gpt2:DIR
  gpt2:DIR          GPT-2 BPE built from DIR/vocab.json + DIR/merges.txt, no download
  cl100k_base, ...  any other tiktoken encoding name
  PATH              a tokenizer.json file, or a directory with tokenizer.json or HF tokenizer files
  NAME or hf:NAME   a Hugging Face hub tokenizer (AutoTokenizer)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import DataError
from .hub import cache_only, offline_note
from .sources import looks_like_path

GPT2_ENV = "MOM_GPT2_DIR"
# sha256 of GPT-2's merges (vocab.bpe == merges.txt): a local copy must be the real thing.
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
EOT_TEXT = "<|endoftext|>"
# End-of-text spellings tried, in order, for tokenizer.json files that do not say which is theirs.
EOT_CANDIDATES = (EOT_TEXT, "</s>", "<|end_of_text|>", "<eos>")


@dataclass(frozen=True)
class TokenizerInfo:
    """What meta.json records about the tokenizer."""
    spec: str
    kind: str
    vocab_size: int
    eot_id: int


class Tokenizer:
    """Base: subclasses implement `encode` / `decode`; batches append end-of-text per document."""

    info: TokenizerInfo

    def encode(self, text: str) -> np.ndarray:
        """Ids of one document, without end-of-text (nanoGPT's encode_ordinary)."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_docs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 ids of all documents, each followed by end-of-text; int64 length of each, EOT included)."""
        parts = [self.encode(t) for t in texts]
        lengths = np.fromiter((len(p) + 1 for p in parts), dtype=np.int64, count=len(parts))
        out = np.empty(int(lengths.sum()), dtype=np.uint32)
        pos = 0
        for part in parts:
            out[pos:pos + len(part)] = part
            pos += len(part)
            out[pos] = self.info.eot_id
            pos += 1
        return out, lengths

    def __reduce__(self):
        # Workers started with `spawn` rebuild the tokenizer from its spec instead of pickling Rust objects.
        return load_tokenizer, (self.info.spec,)


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, end-of-text 256."""

    def __init__(self) -> None:
        self.info = TokenizerInfo(spec="bytes", kind="bytes", vocab_size=257, eot_id=256)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def encode_docs(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # Vectorised: one join and one scatter instead of a Python loop over documents.
        encoded = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter((len(b) + 1 for b in encoded), dtype=np.int64, count=len(encoded))
        out = np.full(int(lengths.sum()), self.info.eot_id, dtype=np.uint32)
        is_text = np.ones(len(out), dtype=bool)
        is_text[np.cumsum(lengths) - 1] = False
        out[is_text] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        return out, lengths

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        pieces = np.split(ids, np.flatnonzero(ids == self.info.eot_id))
        # Each piece after the first starts with the end-of-text id.
        text = [bytes(p[p < 256].astype(np.uint8)).decode("utf-8", errors="replace") for p in pieces]
        return EOT_TEXT.join(text)


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding, spec: str) -> None:
        self.encoding = encoding
        self.info = TokenizerInfo(spec=spec, kind="tiktoken", vocab_size=encoding.n_vocab, eot_id=encoding.eot_token)

    def encode(self, text: str) -> np.ndarray:
        # encode_to_numpy with no special tokens is encode_ordinary without the Python list in between.
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    def __init__(self, backend, spec: str, eot_id: int, vocab_size: int) -> None:
        self.backend = backend
        self.info = TokenizerInfo(spec=spec, kind="huggingface", vocab_size=vocab_size, eot_id=eot_id)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def _gpt2_from_dir(directory: Path, spec: str) -> TiktokenTokenizer:
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise DataError(f"{directory} must hold GPT-2's vocab.json and merges.txt (for --tokenizer gpt2:DIR or {GPT2_ENV})")
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(merges), encoder_json_file=str(vocab),
                                                vocab_bpe_hash=GPT2_MERGES_SHA256)
    except ValueError as err:
        raise DataError(f"{merges} is not GPT-2's merges file ({err}); for another BPE pass its "
                        f"directory as --tokenizer PATH (Hugging Face files) instead") from err
    encoding = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={EOT_TEXT: 50256}, explicit_n_vocab=50257)
    return TiktokenTokenizer(encoding, spec)


def _tiktoken_named(name: str) -> TiktokenTokenizer:
    import tiktoken

    if name == "gpt2" and os.environ.get(GPT2_ENV):
        return _gpt2_from_dir(Path(os.environ[GPT2_ENV]), name)
    try:
        return TiktokenTokenizer(tiktoken.get_encoding(name), name)
    except Exception as err:  # tiktoken raises requests' errors (or others) when it cannot download
        hint = (f"--tokenizer gpt2:/path/to/dir or set {GPT2_ENV}=/path/to/dir (a directory with GPT-2's "
                f"vocab.json + merges.txt)" if name == "gpt2" else "a local --tokenizer PATH")
        raise DataError(f"could not load tiktoken encoding {name!r} ({type(err).__name__}: {str(err)[:120]}); "
                        f"tiktoken downloads its files on first use, so offline point at local files: "
                        f"{hint}, or fill TIKTOKEN_CACHE_DIR") from err


def _find_eot(backend, spec: str) -> int:
    for token in EOT_CANDIDATES:
        if (token_id := backend.token_to_id(token)) is not None:
            return token_id
    raise DataError(f"tokenizer {spec!r} has none of the end-of-text tokens {EOT_CANDIDATES}")


def _hf(spec: str) -> HFTokenizer:
    name = spec.removeprefix("hf:")
    path = Path(name)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(str(path))
        return HFTokenizer(backend, spec, _find_eot(backend, spec), backend.get_vocab_size(with_added_tokens=True))
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name, local_files_only=cache_only())
    except Exception as err:  # hub, network and file-format errors all mean "cannot use this name"
        raise DataError(f"unknown tokenizer {spec!r}: not one of bytes, gpt2, gpt2:DIR or a tiktoken encoding, "
                        f"not a local tokenizer path, and neither the Hugging Face cache nor the hub could "
                        f"provide it ({type(err).__name__}{offline_note()}). Pass a local path or one of "
                        f"those names.") from err
    if hf.eos_token_id is None:
        raise DataError(f"tokenizer {spec!r} defines no end-of-text (eos) token")
    return HFTokenizer(hf.backend_tokenizer, spec, hf.eos_token_id, len(hf))


def _check(tokenizer: Tokenizer) -> Tokenizer:
    # Guards against tokenizers that load "successfully" but empty (transformers 5.x vocab_file= trap).
    ids = tokenizer.encode("Hello world")
    if len(ids) == 0 or int(ids.max()) >= tokenizer.info.vocab_size:
        raise DataError(f"tokenizer {tokenizer.info.spec!r} loaded but encodes 'Hello world' as {ids.tolist()}: "
                        f"it is empty or broken; check its files")
    return tokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """Build the tokenizer named by `spec` (see the module docstring); DataError if it cannot be had."""
    if spec == "bytes":
        return BytesTokenizer()
    if spec.startswith("gpt2:"):
        return _check(_gpt2_from_dir(Path(spec.removeprefix("gpt2:")), spec))
    path = Path(spec.removeprefix("hf:")).expanduser()
    if looks_like_path(spec.removeprefix("hf:")) and not path.exists():
        raise DataError(f"--tokenizer {spec}: no such file or directory (a path is never looked "
                        f"up on the Hugging Face hub)")
    if path.is_dir() and not (path / "tokenizer.json").is_file() \
            and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return _check(_gpt2_from_dir(path, spec))  # GPT-2's own files, as gpt2:DIR
    if not spec.startswith("hf:") and not Path(spec).exists():
        import tiktoken

        if spec in tiktoken.list_encoding_names():
            return _check(_tiktoken_named(spec))
    return _check(_hf(spec))


def load_data_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepared directory was made with (its trained tokenizer.json, if any)."""
    from .format import read_meta

    info = read_meta(data_dir)["tokenizer"]
    return load_tokenizer(str(Path(data_dir) / info["file"]) if "file" in info else info["spec"])
