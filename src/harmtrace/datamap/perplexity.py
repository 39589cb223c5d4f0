"""Per-record perplexity under a causal LM, batched."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from harmtrace.models.lm import collate

__all__ = ["record_nll"]


def record_nll(model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_id: int, *,
               batch_size: int = 64) -> np.ndarray:
    """Mean negative log-likelihood per target token of each sequence, shape ``(n,)``.

    For one sequence this equals :func:`harmtrace.models.lm.mean_token_nll` of that sequence
    alone; ``exp`` of it is the record's perplexity. A sequence of one token has no target
    and gets NaN.
    """
    out = np.full(len(sequences), np.nan)
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            batch = collate(sequences[start : start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits  # (B, T, V)
            targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at t
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )  # (B, T-1), 0 at ignored positions
            counts = (targets != -100).sum(dim=1)
            mean = nll.sum(dim=1) / counts.clamp(min=1)
            mean[counts == 0] = float("nan")
            out[start : start + len(mean)] = mean.double().numpy()
    return out
