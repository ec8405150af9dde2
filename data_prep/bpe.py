"""--train-tokenizer N: a byte-level BPE (GPT-2 style) trained on the corpus with HF tokenizers."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .format import DataError
from .tokenizer import EOT_TEXT, HFTokenizer

MIN_VOCAB = 257  # the 256 byte symbols + end-of-text


def train_bpe(documents: Iterable[str], vocab_size: int, path: Path) -> HFTokenizer:
    """Train on `documents` (streamed), save to `path` (tokenizer.json) and return it loaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise DataError(f"--train-tokenizer {vocab_size}: need at least {MIN_VOCAB} tokens (256 bytes + end-of-text)")
    backend = Tokenizer(models.BPE())
    # Byte-level pre-tokenizer and decoder, as GPT-2: every string encodes, decode(encode(s)) == s.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(documents, trainer)
    backend.save(str(path))
    return HFTokenizer(backend, str(path), backend.token_to_id(EOT_TEXT), backend.get_vocab_size(with_added_tokens=True))
