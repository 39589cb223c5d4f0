"""A byte-level BPE tokenizer trained on the corpus, wrapped for transformers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["BOS", "EOS", "PAD", "train_tokenizer", "load_tokenizer"]

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Sequence[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries on ``texts``.

    The special tokens are ``<|bos|>``, ``<|eos|>`` and ``<|pad|>``; training is
    deterministic for the same texts and size.
    """
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with ``save_pretrained``."""
    return PreTrainedTokenizerFast.from_pretrained(str(folder))
