"""kronfluence (Bae et al., EK-FAC influence as in Grosse et al. 2023) through its API.

Sign: kronfluence's pairwise score is ``g_query^T (G + damping)^-1 g_train`` with the
query gradient of ``compute_measurement`` (here the query loss); up-weighting a train
record moves the parameters by ``-H^-1 g_train``, so a positive score means the record
lowers the query loss: **the same sign as harmtrace**, used as is (scores are already
``(n_query, n_train)``).

Settings matched with harmtrace's EK-FAC (:data:`benchmarks.lds.methods.MATCHED`): strategy
``ekfac``, true Fisher (``use_empirical_fisher=False``, labels sampled in
``compute_train_loss(sample=True)``), damping ``None`` = 0.1 x the mean eigenvalue per
module, every ``nn.Linear`` tracked (kronfluence's default; GPT-2's ``Conv1D`` blocks are not
tracked by kronfluence, so on T2 only its linear head is).
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from benchmarks.lds.tasks import BenchTask

__all__ = ["kronfluence_scores"]


def _make_task(bench: BenchTask, modules: list[str]):
    from kronfluence.task import Task

    attr = bench.attr_task

    class _Task(Task):
        def get_influence_tracked_modules(self) -> list[str]:
            return modules

        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            if bench.name == "T1":
                logits = model(batch["x"])  # (B, 10)
                if not sample:
                    return F.cross_entropy(logits, batch["y"], reduction="sum")
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(logits.detach(), -1), 1)[:, 0]
                return F.cross_entropy(logits, drawn, reduction="sum")
            if not sample:
                return attr.train_loss(model, batch).sum()
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
            return attr.sampled_loss(model, batch, generator).sum()

        def compute_measurement(self, batch, model) -> torch.Tensor:
            return attr.query_loss(model, batch).sum()

    return _Task()


class _Listed(torch.utils.data.Dataset):
    def __init__(self, examples: list) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.examples[index]


def _linearised(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every GPT-2 ``Conv1D`` replaced by an equal ``nn.Linear`` (in place)."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                d_in, d_out = child.weight.shape  # Conv1D stores (in, out): y = x W + b
                linear = torch.nn.Linear(d_in, d_out, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model


def kronfluence_scores(bench: BenchTask, model: torch.nn.Module, clock,
                       strategy: str = "ekfac") -> np.ndarray:
    """Pairwise kronfluence scores ``(n_query, n_train)``, harmtrace's sign."""
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from harmtrace.attribute.layers import tracked_modules

    torch.manual_seed(0)
    # the modules harmtrace tracks (GPT-2's output head, tied to the embedding, is not one)
    task = _make_task(bench, tracked_modules(model))
    model = prepare_model(_linearised(copy.deepcopy(model).float().eval()), task)
    collate = DataLoaderKwargs(collate_fn=bench.attr_task.collate, num_workers=0)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer(analysis_name="lds", model=model, task=task, cpu=True,
                            disable_tqdm=True, output_dir=out)
        analyzer.set_dataloader_kwargs(collate)
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=False,
                                      has_shared_parameters=bench.name != "T1")
        with clock.fit():
            analyzer.fit_all_factors("f", dataset=_Listed(bench.train),
                                     per_device_batch_size=64, factor_args=factor_args)
        with clock.score():
            analyzer.compute_pairwise_scores(
                "s", "f", query_dataset=_Listed(bench.queries),
                train_dataset=_Listed(bench.train), per_device_query_batch_size=64,
                per_device_train_batch_size=128,
                score_args=ScoreArguments(damping_factor=None))
            scores = analyzer.load_pairwise_scores("s")["all_modules"]
    return scores.double().numpy()  # (n_query, n_train)
