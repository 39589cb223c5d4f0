"""Fixtures for fast tests: a 300-entry BPE tokenizer, a 1-layer GPT-2, tiny pipeline
configs written as TOML, and a runner for the command line in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from harmtrace.models.lm import LMSettings, build_lm
from harmtrace.models.tokenizer import train_tokenizer
from harmtrace.scenario.offensive_tweets import Scenario

__all__ = [
    "CORPUS", "TINY", "run_cli", "tiny_lm", "tiny_pipeline_tables", "tiny_tokenizer",
    "toml_text", "toml_value",
]

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


def toml_value(value: object) -> str:
    """``value`` (bool, number, string or list of them) as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def toml_text(tables: dict[str, object]) -> str:
    """A TOML document: ``{"train": {...}}`` is a table, ``{"sources": [{...}]}`` an array."""
    lines: list[str] = []
    for name, table in tables.items():
        items = table if isinstance(table, list) else [table]
        header = f"[[{name}]]" if isinstance(table, list) else f"[{name}]"
        for item in items:
            lines.append(header)
            lines += [f"{key} = {toml_value(value)}" for key, value in item.items()]
            lines.append("")
    return "\n".join(lines)


def tiny_pipeline_tables(scenario: Scenario, workspace: Path) -> dict[str, object]:
    """Config tables that run every stage on ``scenario`` in seconds with a tiny model.

    Each source is cut to 40 records; the report lists all 200, tweets and their handles
    included, so masking is tested on every record.

    ``threshold = 0.0`` makes every generation count as harmful, so attribution always has
    queries however little the one-epoch model learned.
    """
    return {
        "workspace": {"path": str(workspace)},
        "sources": [{**source, "max_records": 40} for source in scenario.sources],
        "heldout": {"path": str(scenario.heldout)},
        "train": {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 400,
                  "max_length": 32, "epochs": 1, "n_checkpoints": 2, "seed": 0},
        "behaviour": {"name": "offensive-language", "scorer": "profanity",
                      "threshold": 0.0, "probes": ["RT @user: I just", "@user you", "lol"],
                      "samples_per_probe": 4, "max_new_tokens": 8},
        "attribute": {"methods": ["gradcos", "bm25"], "projection_dim": 32, "k": 0.1},
        "verify": {"enabled": False},
        "report": {"top_records": 200},
    }


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m harmtrace ARGS`` in a fresh process; ``env`` overrides variables."""
    environ = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **env}
    return subprocess.run([sys.executable, "-m", "harmtrace", *args], capture_output=True,
                          text=True, timeout=timeout, env=environ, check=False)
