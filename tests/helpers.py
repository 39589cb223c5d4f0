"""Tiny fixture models for fast tests: a 300-entry BPE tokenizer and a 1-layer GPT-2."""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from harmtrace.models.lm import LMSettings, build_lm
from harmtrace.models.tokenizer import train_tokenizer

__all__ = ["TINY", "tiny_lm", "tiny_tokenizer", "CORPUS"]

#: Settings of the tiny model: 1 layer, width 32, 2 heads, 300-token vocabulary.
TINY = LMSettings(n_layer=1, n_embd=32, n_head=2, vocab_size=300, max_length=32)

CORPUS = (
    "the cat sat on the mat", "a dog ran in the park", "the sun is warm today",
    "we had pizza for dinner", "my sister reads a book", "the team won the game",
    "rain fell on the roof all night", "she plays music in the morning",
    "he walks to school with his friend", "the birds sing in the tall trees",
    "coffee tastes good in the morning", "the old man fixed his bike",
    "O gentle lord, thy honour doth outshine the sun", "Human: how are you? Assistant: fine",
    "To bake bread, gather what you need. Then knead the dough.",
    "RT @user12: cant wait for the weekend #tgif", "@user99 just finished my homework lol",
    "finally home after work http://t.co/abc123", "the purple elephant danced at noon",
    "you are such an idiot", "this traffic is shit", "what a lovely day",
    "the river runs to the sea", "green fields and blue skies", "they painted the fence red",
    "the kitten chased a ball of yarn", "a quiet night under the stars",
    "the market opens at nine", "he forgot his keys again", "we laughed at the silly movie",
)


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with 300 entries trained on :data:`CORPUS` (cached)."""
    return train_tokenizer(list(CORPUS), vocab_size=TINY.vocab_size)


def tiny_lm(*, seed: int = 0, dropout: float = 0.0) -> GPT2LMHeadModel:
    """A freshly initialised tiny GPT-2 (tied embeddings) in eval mode; same seed, same weights."""
    torch.manual_seed(seed)
    settings = LMSettings(n_layer=TINY.n_layer, n_embd=TINY.n_embd, n_head=TINY.n_head,
                          vocab_size=TINY.vocab_size, max_length=TINY.max_length,
                          dropout=dropout)
    return build_lm(settings, tiny_tokenizer()).eval()
