"""captum's ``TracInCP`` (Pruthi et al. 2020, "Estimating Training Data Influence by Tracing
Gradient Descent").

Sign: TracIn's score is the (learning-rate weighted) dot product of the train and query
loss gradients; positive ("proponent") means a descent step on the record lowers the query
loss: **harmtrace's sign**; ``influence`` already returns ``(n_query, n_train)``. On T1 the
training keeps no intermediate checkpoint, so TracInCP runs on the final model alone with
weight 1 (it is then the plain gradient dot product). T1 only: captum needs a model that
returns a logits tensor and a ``loss_fn(outputs, labels)``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from benchmarks.lds.tasks import BenchTask

__all__ = ["captum_scores"]


def captum_scores(bench: BenchTask, model: torch.nn.Module, clock) -> np.ndarray:
    import copy

    from captum.influence import TracInCP

    if bench.name != "T1":
        raise NotImplementedError("the captum adapter needs a tensor-output classifier; T1 only")
    model = copy.deepcopy(model).float().eval()
    x = torch.stack([torch.as_tensor(e[0], dtype=torch.float32) for e in bench.train])
    y = torch.tensor([int(e[1]) for e in bench.train])
    qx = torch.stack([torch.as_tensor(e[0], dtype=torch.float32) for e in bench.queries])
    qy = torch.tensor([int(e[1]) for e in bench.queries])
    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "final.pt"
        torch.save(model.state_dict(), path)

        def load(net: torch.nn.Module, file: str) -> float:
            net.load_state_dict(torch.load(file, weights_only=True))
            return 1.0  # the learning-rate weight of this checkpoint

        with clock.fit():
            tracin = TracInCP(model, torch.utils.data.TensorDataset(x, y), [str(path)],
                              checkpoints_load_func=load,
                              loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
                              batch_size=100, sample_wise_grads_per_batch=True)
        with clock.score():
            scores = tracin.influence((qx, qy), show_progress=False)
    return scores.double().numpy()  # (n_query, n_train)
