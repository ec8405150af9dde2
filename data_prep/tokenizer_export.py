"""Any mom-prep tokenizer as a transformers tokenizer (PreTrainedTokenizerFast), with the
same ids: what `mom-convert to-hf` writes beside an exported model, so that
AutoTokenizer.from_pretrained(DIR) encodes text as the run's data was encoded, with
transformers 4.x as with 5.x (save_tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from mom_ds.engine_adapter import tiktoken_bpe

from .tokenizer import EOT_TEXT, BytesTokenizer, HFTokenizer, TiktokenTokenizer, Tokenizer


def _byte_alphabet() -> list[str]:
    """The printable character byte-level BPE uses for each byte value (GPT-2's table)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def _byte_level(vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str | None):
    """A byte-level BPE tokenizers.Tokenizer: `pattern` splits the text before the bytes
    are merged (tiktoken's regex), None keeps the text whole (the bytes tokenizer)."""
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, pre_tokenizers

    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.pre_tokenizer = byte_level if pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), byte_level])
    backend.decoder = decoders.ByteLevel()
    return backend


def _from_bytes(tokenizer: BytesTokenizer):
    backend = _byte_level({c: b for b, c in enumerate(_byte_alphabet())}, [], None)
    backend.add_special_tokens([EOT_TEXT])  # id 256, the next one
    return backend


def _from_tiktoken(tokenizer: TiktokenTokenizer):
    """tiktoken's ranks as BPE merges: a token of rank r is made by merging two shorter
    tokens, each pair ordered by r and then by the parts' ranks (a token may have several
    splits; the one of lowest ranks is met first, as tiktoken's merge loop meets it)."""
    encoding = tokenizer.encoding
    alphabet = _byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    ranks, pattern, special = tiktoken_bpe(encoding)
    merges = []
    for token, rank in ranks.items():
        splits = [(ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, left, right, token[:i], token[i:]) for left, right, i in splits]
    merges.sort()
    vocab = {spell(token): rank for token, rank in ranks.items()}
    backend = _byte_level(vocab, [(spell(a), spell(b)) for *_, a, b in merges],
                          pattern)
    for text, token_id in sorted(special.items(), key=lambda item: item[1]):
        backend.add_special_tokens([text])
        assert backend.token_to_id(text) == token_id, (text, token_id)  # ids stay dense
    return backend


def transformers_tokenizer(tokenizer: Tokenizer):
    """A PreTrainedTokenizerFast with the tokenizer's ids; end-of-text is its bos, eos and
    pad token (GPT-2's convention)."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, BytesTokenizer):
        backend = _from_bytes(tokenizer)
    elif isinstance(tokenizer, TiktokenTokenizer):
        backend = _from_tiktoken(tokenizer)
    elif isinstance(tokenizer, HFTokenizer):
        backend = tokenizer.backend
    else:
        raise TypeError(f"no transformers form for {type(tokenizer).__name__}")
    eot = backend.id_to_token(tokenizer.info.eot_id)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=eot, eos_token=eot,
                                   pad_token=eot, unk_token=None,
                                   model_max_length=int(1e30), clean_up_tokenization_spaces=False)


# transformers 5 saves PreTrainedTokenizerFast under its new name, which 4.x's AutoTokenizer
# does not know; the old name still loads the same class in 5.x.
_RENAMED_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _string_merges(path: Path) -> None:
    """BPE merges in tokenizer.json as "left right" strings. tokenizers 0.20 on write them as
    [left, right] pairs and read both forms; 0.19 (transformers 4.44) reads only strings.
    Byte-level parts never hold a space, so the string form is exact for them; a merge whose
    part holds one (a BPE that is not byte-level) keeps the pair form, which only
    transformers 4.45 on reads."""
    backend = json.loads(path.read_text(encoding="utf-8"))
    merges = backend["model"].get("merges") or []
    if any(isinstance(merge, list) for merge in merges) and \
            not any(" " in part for merge in merges for part in merge):
        backend["model"]["merges"] = [" ".join(merge) for merge in merges]
        path.write_text(json.dumps(backend, ensure_ascii=False, indent=2) + "\n",
                        encoding="utf-8")


def save_tokenizer(tokenizer: Any, directory: Union[str, Path]) -> None:
    """tokenizer.save_pretrained(directory), in files that transformers 4.44 to 5.x read
    alike: tokenizer_config.json names a class each knows, tokenizer.json holds its merges
    in the form each tokenizers library reads."""
    tokenizer.save_pretrained(directory)
    path = Path(directory) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    name = config.get("tokenizer_class")
    if name in _RENAMED_CLASSES:
        config["tokenizer_class"] = _RENAMED_CLASSES[name]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (Path(directory) / "tokenizer.json").is_file():
        _string_merges(Path(directory) / "tokenizer.json")
