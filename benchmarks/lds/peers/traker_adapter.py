"""traker (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale") with its CPU
projector (``BasicProjector``, chosen by ``TRAKer`` itself when ``device="cpu"``).

Sign: TRAK scores are positive when a train record raised the query's correct-class margin
``log p / (1 - p)``, i.e. lowered its cross-entropy: **harmtrace's sign**. ``finalize_scores``
returns ``(n_train, n_query)``; we transpose. Only T1 (image-classification output
function); traker ships no causal-LM output function.
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
from benchmarks.lds.tasks import BenchTask

__all__ = ["traker_scores"]


def _batches(examples: list, size: int):
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        x = torch.stack([torch.as_tensor(e[0], dtype=torch.float32) for e in chunk])
        y = torch.tensor([int(e[1]) for e in chunk], dtype=torch.long)
        yield [x, y], len(chunk)


def traker_scores(bench: BenchTask, model: torch.nn.Module, clock,
                  proj_dim: int = 2048) -> np.ndarray:
    """TRAK scores ``(n_query, n_train)`` of one model, harmtrace's sign."""
    import copy
    import logging

    from trak import TRAKer

    if bench.name != "T1":
        raise NotImplementedError("traker has no causal-LM output function; T1 only")
    model = copy.deepcopy(model).float().eval()
    with tempfile.TemporaryDirectory() as out:
        with clock.fit():
            traker = TRAKer(model=model, task="image_classification",
                            train_set_size=len(bench.train), save_dir=out, device="cpu",
                            proj_dim=proj_dim, use_half_precision=False,
                            logging_level=logging.ERROR)
            traker.load_checkpoint(model.state_dict(), model_id=0)
            for batch, n in _batches(bench.train, 100):
                traker.featurize(batch=batch, num_samples=n)
            traker.finalize_features()
        with clock.score():
            traker.start_scoring_checkpoint(exp_name="q", checkpoint=model.state_dict(),
                                            model_id=0, num_targets=len(bench.queries))
            for batch, n in _batches(bench.queries, 100):
                traker.score(batch=batch, num_samples=n)
            scores = np.asarray(traker.finalize_scores(exp_name="q"), dtype=np.float64)
    return scores.T  # (n_query, n_train)
