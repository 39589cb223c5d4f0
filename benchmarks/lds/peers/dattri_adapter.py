"""dattri (Deng et al. 2024, "dattri: A Library for Efficient Data Attribution") attributors
on CPU: TracIn / Grad-Dot, TRAK, and the influence-function variants (explicit Hessian,
conjugate gradient, LiSSA, DataInf, EK-FAC).

Sign: every dattri attributor used here is an inner product of the train record's loss
gradient with the (inverse-curvature transformed) query target gradient, the target being
the query loss; positive means a descent step on the record lowers the query loss:
**harmtrace's sign** (TRAK's target is the correct-class probability, whose gradient is
the negative of the loss's, and dattri's TRAK returns its standard "helpful is positive"
score). ``attribute`` returns ``(n_train, n_query)``; we transpose. T1 only: the adapters
need a ``functional_call``-able classifier on ``(x, y)`` pairs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from benchmarks.lds.tasks import BenchTask

__all__ = ["SLOW", "VARIANTS", "dattri_scores"]

# name -> (attributor class name, constructor kwargs); the slow ones are in SLOW
VARIANTS = {
    "tracin": ("TracInAttributor", {"weight_list": None, "normalized_grad": False}),
    "trak": ("TRAKAttributor", {"projector_kwargs": {"proj_dim": 2048, "device": "cpu"}}),
    "if-explicit": ("IFAttributorExplicit", {"regularization": 1e-3}),
    "if-cg": ("IFAttributorCG", {"regularization": 1e-3, "max_iter": 20}),
    "if-lissa": ("IFAttributorLiSSA", {"damping": 1e-3, "recursion_depth": 200,
                                       "batch_size": 50}),
    "datainf": ("IFAttributorDataInf", {"regularization": 1e-3}),
    "if-ekfac": ("IFAttributorEKFAC", {"damping": 1e-3}),
}

# over 30 s each on T1 with 2 CPU cores (DataInf also peaks at ~8 GiB)
SLOW = ("if-explicit", "if-cg", "datainf", "if-lissa")


def _loaders(bench: BenchTask):
    def tensors(examples):
        x = torch.stack([torch.as_tensor(e[0], dtype=torch.float32) for e in examples])
        y = torch.tensor([int(e[1]) for e in examples])
        return torch.utils.data.TensorDataset(x, y)

    train = torch.utils.data.DataLoader(tensors(bench.train), batch_size=100, shuffle=False)
    query = torch.utils.data.DataLoader(tensors(bench.queries), batch_size=100, shuffle=False)
    return train, query


def dattri_scores(bench: BenchTask, model: torch.nn.Module, clock, variant: str) -> np.ndarray:
    """Scores ``(n_query, n_train)`` of dattri's ``variant`` (a key of :data:`VARIANTS`)."""
    import copy

    import dattri.algorithm as algorithms
    from dattri.task import AttributionTask

    if bench.name != "T1":
        raise NotImplementedError("the dattri adapter is written for the T1 classifier only")
    model = copy.deepcopy(model).float().eval()

    def loss(params, data):
        x, y = data
        if x.dim() == 1:  # a single example under vmap
            x, y = x.unsqueeze(0), y.unsqueeze(0)
        logits = torch.func.functional_call(model, params, (x,))
        return F.cross_entropy(logits, y)

    def correct_probability(params, data):
        return torch.exp(-loss(params, data))

    cls_name, kwargs = VARIANTS[variant]
    kwargs = dict(kwargs)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    if variant == "tracin":
        kwargs["weight_list"] = torch.ones(1)
    if variant == "trak":
        kwargs["correct_probability_func"] = correct_probability
    train, query = _loaders(bench)
    with clock.fit():
        attributor = getattr(algorithms, cls_name)(task=task, device="cpu", **kwargs)
        if variant != "tracin":
            attributor.cache(train)
    with clock.score():
        if variant == "trak":
            scores = attributor.attribute(query)  # the train loader given to cache()
        else:
            scores = attributor.attribute(train, query)
    return scores.detach().double().numpy().T  # (n_query, n_train)
