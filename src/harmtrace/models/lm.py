"""Small GPT-2-style causal LMs: build from settings, train with fixed seeds, checkpoint.

A training record is encoded as ``<|bos|> text <|eos|>`` and cut to ``max_length`` tokens.
Batches are padded on the right; labels at pad positions are -100 so that padding never
contributes to the loss. The loss of a batch is the mean over its real target tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from harmtrace._logging import get_logger
from harmtrace.errors import ConfigError, NumericalError
from harmtrace.hashing import sha256_file
from harmtrace.seeding import seed_everything

__all__ = [
    "GRAD_CLIP_NORM",
    "Checkpoint",
    "LMSettings",
    "TrainedLM",
    "batch_order",
    "build_lm",
    "collate",
    "encode_texts",
    "prompt_ids",
    "train_lm",
    "warmup_steps",
]

log = get_logger(__name__)

#: Global gradient norm every training step is clipped to (``clip_grad_norm_``).
GRAD_CLIP_NORM = 1.0


@dataclass(frozen=True)
class LMSettings:
    """Architecture and training settings of a small causal LM.

    Attributes
    ----------
    n_layer, n_embd, n_head:
        Transformer depth, width and heads (``n_embd`` divisible by ``n_head``).
    vocab_size:
        Size of the BPE vocabulary trained on the corpus (>= 300).
    max_length:
        Tokens per training record after truncation, special tokens included.
    epochs, batch_size, learning_rate, weight_decay, warmup_fraction:
        Optimiser settings (AdamW with linear warm-up and cosine decay).
    n_checkpoints:
        Checkpoints saved at evenly spaced steps, the last at the end (used by TracIn).
    """

    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 2048
    max_length: int = 64
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    n_checkpoints: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        positive = ("n_layer", "n_embd", "n_head", "max_length", "epochs", "batch_size",
                    "n_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"train.n_embd ({self.n_embd}) must be divisible by train.n_head "
                f"({self.n_head}); change one of them"
            )
        if self.vocab_size < 300:
            raise ConfigError(f"train.vocab_size must be >= 300, got {self.vocab_size}")
        if not 0 < self.learning_rate < 1:
            raise ConfigError(f"train.learning_rate must be in (0, 1), got {self.learning_rate}")


@dataclass(frozen=True)
class Checkpoint:
    """A saved model state: training step, folder and SHA-256 of its safetensors file."""

    step: int
    path: str
    sha256: str
    learning_rate: float


@dataclass
class TrainedLM:
    model: GPT2LMHeadModel
    checkpoints: list[Checkpoint] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def build_lm(settings: LMSettings, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2-style model sized by ``settings``."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=settings.max_length,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        resid_pdrop=settings.dropout,
        embd_pdrop=settings.dropout,
        attn_pdrop=settings.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        loss_type="ForCausalLM",
    )
    config._attn_implementation = "eager"  # eager attention keeps torch.func transforms valid
    return GPT2LMHeadModel(config)


def encode_texts(
    tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], *, max_length: int
) -> list[list[int]]:
    """Token ids ``[bos, *text, eos]`` of each text, cut to ``max_length``.

    A tokenizer without a BOS (or EOS) token gets none added; the same rule is used for
    probes (:func:`prompt_ids`), so training and attribution see one tokenisation.
    """
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return [(prompt_prefix(tokenizer) + ids + eos)[:max_length] for ids in encoded]


def prompt_prefix(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """``[bos]``, or ``[]`` for a tokenizer without a BOS token."""
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def prompt_ids(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """Token ids of a probe prompt, with the same prefix as training records."""
    return prompt_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def collate(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``sequences``; labels are -100 wherever the attention mask is 0."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def warmup_steps(total: int, settings: LMSettings) -> int:
    """Steps of linear warm-up in a training of ``total`` steps (at least 1)."""
    return max(1, int(settings.warmup_fraction * total))


def batch_order(n_records: int, settings: LMSettings, *, seed: int) -> list[list[int]]:
    """The record indices of every optimiser step of :func:`train_lm`, in order.

    Each epoch visits the records in a permutation drawn from one generator seeded with
    ``seed``, cut into batches of ``settings.batch_size`` (the last one smaller). The exact
    replay (:mod:`harmtrace.attribute.exact`) reads the order from here, so the two never
    drift apart.
    """
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(settings.epochs):
        order = torch.randperm(n_records, generator=generator).tolist()
        steps += [order[start : start + settings.batch_size]
                  for start in range(0, n_records, settings.batch_size)]
    return steps


def _lr_at(step: int, total: int, settings: LMSettings) -> float:
    warm = warmup_steps(total, settings)
    if step < warm:
        return settings.learning_rate * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return settings.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def train_lm(
    sequences: Sequence[Sequence[int]],
    tokenizer: PreTrainedTokenizerFast,
    settings: LMSettings,
    *,
    seed: int,
    out_dir: Path | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainedLM:
    """Train a new model on ``sequences`` (token ids) from scratch.

    The order of examples and the initial weights depend only on ``seed``, so the same seed
    and data give the same model. With ``out_dir``, ``settings.n_checkpoints`` checkpoints are
    saved as safetensors under ``out_dir/checkpoint-STEP``.
    """
    seed_everything(seed)
    model = build_lm(settings, tokenizer)
    steps = batch_order(len(sequences), settings, seed=seed)
    total = len(steps)
    n_ckpt = settings.n_checkpoints
    save_at = {round(total * (i + 1) / n_ckpt) for i in range(n_ckpt)}
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    result = TrainedLM(model=model)
    model.train()
    for step, rows in enumerate(steps):
        batch = collate([sequences[i] for i in rows], tokenizer.pad_token_id)
        lr = _lr_at(step, total, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise NumericalError(
                f"training loss became {loss.item()} at step {step}; lower "
                f"train.learning_rate (now {settings.learning_rate})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        result.losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, total, loss.item())
        if out_dir is not None and step + 1 in save_at:
            result.checkpoints.append(_save_checkpoint(model, out_dir, step + 1, lr))
    model.eval()
    return result


def _save_checkpoint(model: GPT2LMHeadModel, out_dir: Path, step: int, lr: float) -> Checkpoint:
    folder = Path(out_dir) / f"checkpoint-{step}"
    model.save_pretrained(folder, safe_serialization=True)
    digest = sha256_file(folder / "model.safetensors")
    log.info("saved checkpoint %s", folder)
    return Checkpoint(step=step, path=str(folder), sha256=digest, learning_rate=lr)


def mean_token_nll(
    model: GPT2LMHeadModel, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64
) -> float:
    """Mean negative log-likelihood per target token over ``sequences`` (perplexity = exp)."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = collate(sequences[start : start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            # logits: (B, T, V); predict token t+1 from position t
            targets = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum"
            )
            total += nll.item()
            count += int((targets != -100).sum())
    return total / max(count, 1)

