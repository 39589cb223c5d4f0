"""The benchmark tasks: data, a trainer that takes per-record weights, and the measurement.

A :class:`BenchTask` holds the train and query examples in the form an
:class:`~harmtrace.attribute.task.AttributionTask` takes, a ``fit(mask)`` that trains one
model on the records where ``mask`` is True (always with the same training seed), and a
``measure(model)`` that returns each query's loss ``(n_query,)``. The LDS correlates a
method's predicted effect with ``-measure`` (see :mod:`benchmarks.lds.protocol`).

* **T1**, digits: ``sklearn.datasets.load_digits`` (1,797 8x8 images), 1,000 train and 200
  query records, an MLP 64-32-10 (tanh) in float64 trained by
  :func:`harmtrace.attribute.exact.train_weighted` (SGD with momentum, fixed batch order);
  a removed record has weight 0, so its batch slots stay empty, exactly as the exact replay
  sees it. Measurement: the cross-entropy of each query.
* **T2**, Shakespeare: 1,000 train and 50 query passages of tinyshakespeare, a BPE tokenizer
  trained on the train passages, a 2-layer GPT-2 (:func:`harmtrace.models.lm.train_lm`,
  AdamW, seed 0). A subset model is trained on the kept passages only. Measurement: the
  summed next-token NLL of each query passage.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmtrace.attribute.task import AttributionTask, ClassificationTask, LMTask
from harmtrace.errors import ConfigError, InputDataError

__all__ = ["BenchTask", "TASKS", "build_task"]

SHAKESPEARE = Path(os.environ.get("HARMTRACE_DATA_DIR", "/work/shared/data")) / (
    "tinyshakespeare/data/tinyshakespeare/input.txt")


@dataclass
class BenchTask:
    """One benchmark task; see the module docstring.

    ``train`` and ``queries`` are lists of examples for ``attr_task``. ``fit(mask)`` returns a
    model trained on the records ``j`` with ``mask[j]`` True; ``measure(model)`` returns the
    query losses ``(n_query,)``. ``extra`` carries what some methods need (texts, tokenizer,
    checkpoints, the replay spec).
    """

    name: str
    description: str
    train: list
    queries: list
    attr_task: AttributionTask
    fit: Callable[[np.ndarray], torch.nn.Module]
    measure: Callable[[torch.nn.Module], np.ndarray]
    settings: dict
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """A content hash of the settings, the data and the code version of the task."""
        blob = json.dumps({"settings": self.settings, "name": self.name},
                          sort_keys=True, default=str)
        data = hashlib.sha256(blob.encode())
        data.update(repr([_example_key(e) for e in self.train]).encode())
        data.update(repr([_example_key(e) for e in self.queries]).encode())
        return data.hexdigest()[:16]


def _example_key(example: Any) -> Any:
    if isinstance(example, tuple):
        return (np.asarray(example[0]).round(6).tolist(), int(example[1]))
    return list(example)


# -- T1: digits MLP ------------------------------------------------------------------------


class DigitsMLP(torch.nn.Module):
    """64-32-10 tanh MLP; ``forward(x)`` maps ``(B, 64)`` to logits ``(B, 10)``."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(64, hidden)
        self.fc2 = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def digits_factory() -> torch.nn.Module:
    """A fresh float64 :class:`DigitsMLP` (float64 keeps the exact replay accurate)."""
    return DigitsMLP().double()


def build_t1(*, quick: bool) -> BenchTask:
    from sklearn.datasets import load_digits

    from harmtrace.attribute.exact import ReplaySpec, train_weighted

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    n_train, n_query = 1000, (40 if quick else 200)
    x = (x / 16.0).astype(np.float32)
    train = [(x[i], int(y[i])) for i in order[:n_train]]
    queries = [(x[i], int(y[i])) for i in order[n_train : n_train + n_query]]
    spec = ReplaySpec(lr=0.1, epochs=4, batch_size=64, seed=0, init_seed=0, momentum=0.9)
    task = ClassificationTask()

    def fit(mask: np.ndarray) -> torch.nn.Module:
        return train_weighted(spec, digits_factory, task, train, mask.astype(np.float64))

    def measure(model: torch.nn.Module) -> np.ndarray:
        return _losses(task, model, queries, batch_size=256)

    settings = {"n_train": n_train, "n_query": n_query, "spec": repr(spec), "model": "64-32-10"}
    return BenchTask("T1", "digits MLP 64-32-10, SGD+momentum, 4 epochs; query CE loss",
                     train, queries, task, fit, measure, settings,
                     extra={"spec": spec, "factory": digits_factory})


# -- T2: Shakespeare LM --------------------------------------------------------------------


def shakespeare_passages(n: int, *, chars: int = 160, path: Path = SHAKESPEARE) -> list[str]:
    """``n`` passages of about ``chars`` characters, cut at line ends, in file order."""
    if not path.exists():
        raise InputDataError(f"{path} does not exist; set HARMTRACE_DATA_DIR to the folder "
                             "that holds tinyshakespeare/")
    passages, current = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        current = f"{current}\n{line}" if current else line
        if len(current) >= chars:
            passages.append(current)
            current = ""
            if len(passages) == n:
                break
    return passages


def build_t2(*, quick: bool) -> BenchTask:
    from harmtrace.models.lm import LMSettings, encode_texts, train_lm
    from harmtrace.models.tokenizer import train_tokenizer

    n_train, n_query = 1000, (20 if quick else 50)
    # every 21st passage is a query, so queries come from the same plays as the train set
    passages = shakespeare_passages(n_train + n_query)
    is_query = np.zeros(len(passages), dtype=bool)
    is_query[np.linspace(0, len(passages) - 1, n_query).astype(int)] = True
    train_texts = [p for p, q in zip(passages, is_query, strict=True) if not q][:n_train]
    query_texts = [p for p, q in zip(passages, is_query, strict=True) if q]
    tokenizer = train_tokenizer(train_texts, vocab_size=512)
    lm = LMSettings(n_layer=2, n_embd=64, n_head=4, vocab_size=512, max_length=48, epochs=2,
                    batch_size=16, learning_rate=3e-3, n_checkpoints=3)
    train = encode_texts(tokenizer, train_texts, max_length=lm.max_length)
    queries = encode_texts(tokenizer, query_texts, max_length=lm.max_length)
    task = LMTask(pad_id=tokenizer.pad_token_id)
    extra: dict[str, Any] = {"tokenizer": tokenizer, "lm": lm, "train_texts": train_texts,
                             "query_texts": query_texts}

    def fit(mask: np.ndarray, out_dir: Path | None = None) -> torch.nn.Module:
        kept = [train[j] for j in np.flatnonzero(mask)]
        result = train_lm(kept, tokenizer, lm, seed=0, out_dir=out_dir)
        extra["checkpoints"] = result.checkpoints
        return result.model

    def measure(model: torch.nn.Module) -> np.ndarray:
        return _losses(task, model, queries, batch_size=64)

    settings = {"n_train": n_train, "n_query": n_query, "lm": repr(lm), "vocab": 512}
    return BenchTask("T2", "Shakespeare GPT-2 2x64, AdamW, 2 epochs; query summed NLL",
                     train, queries, task, fit, measure, settings, extra=extra)


def _losses(task: AttributionTask, model: torch.nn.Module, examples: Sequence[Any], *,
            batch_size: int) -> np.ndarray:
    """``task.query_loss`` of every example ``(n,)``, in eval mode, without gradients."""
    dtype = next(model.parameters()).dtype
    out = np.zeros(len(examples))
    model.eval()
    with torch.no_grad():
        for rows, batch in task.batches(examples, batch_size):
            batch = {k: v.to(dtype) if torch.is_floating_point(v) else v
                     for k, v in batch.items()}
            out[rows] = task.query_loss(model, batch).double().numpy()
    return out


TASKS: dict[str, Callable[..., BenchTask]] = {"T1": build_t1, "T2": build_t2}


def build_task(name: str, *, quick: bool = False) -> BenchTask:
    """The task called ``name`` (``T1``, ``T2``; ``T3`` runs through :mod:`.t3`)."""
    if name not in TASKS:
        raise ConfigError(f"task {name!r} is unknown; choose from {', '.join(TASKS)} or T3")
    return TASKS[name](quick=quick)
