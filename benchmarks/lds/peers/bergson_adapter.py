"""EleutherAI's bergson 2.5.1 (gradient-store attribution) through its Python API.

Path (no CLI, nothing downloaded, CPU, one temporary folder for the factor files):

1. **Fit** (``clock.fit``): :func:`bergson.hessians.hessian_approximations.fit_factored_hessians`
   with ``HessianConfig(method="kfac", ev_correction=True)``, i.e. EK-FAC: bergson's
   ``CovarianceCollector`` (activation and output-gradient covariances), their
   eigendecomposition, then its ``LambdaCollector`` (eigenvalue correction). Labels are
   sampled from the model (``use_dataset_labels=False``: the true Fisher), fp32.
   The factors are written as safetensors under a :mod:`tempfile` folder, which bergson needs
   (its factored Hessian has no in-memory form), and read back with
   :func:`bergson.hessians.preconditioner.load_preconditioner`.
2. **Score** (``clock.score``): the per-query gradients with
   :class:`bergson.InMemoryCollector` (no projection), the damped inverse applied to them
   (``InversionConfig("damped_inverse", damping_factor=0.1)``: ``1 / (lambda + 0.1 x mean
   lambda)`` per module, the rule of :data:`benchmarks.lds.methods.MATCHED`), then one more
   ``InMemoryCollector`` pass over the train records with a streaming :class:`bergson.Scorer`
   (``InMemorySequenceScoreWriter``) that dots each train gradient with every
   preconditioned query gradient without storing the train gradients.

Settings: no random projection (``projection_dim=0``: bergson refuses EK-FAC's eigenvalue
correction with a projection), no normalisation (``unit_normalize=False``, no Adam/Adafactor
normaliser: plain influence, not TrackStar's cosine), biases included
(``include_bias=True``), per-record loss summed over targets (``loss_reduction="sum"``),
model in float32, one batch of 64 records per step.

Tracked modules: bergson hooks the supported layers (``nn.Linear``, HF ``Conv1D``, ...) of
``model.base_model``. On T1 that is both ``nn.Linear`` of the MLP. On T2 it is every
``Conv1D`` of the GPT-2 blocks (``c_attn``, ``c_proj``, ``c_fc``, ``mlp.c_proj``); the
``lm_head`` (outside ``base_model``, and tied to the embedding) is not tracked.

Adaptation: bergson drives a Hugging Face causal LM (``model(input_ids).logits``, loss on
``logits[:, :-1]`` against ``labels[:, 1:]``) and its hooks require activations of shape
``[N, S, I]``. T2's GPT-2 is used as it is. T1's MLP is wrapped so that a record is the
2-token "sequence" ``[row, row]`` (``row`` indexes a feature table) with labels
``[-100, class]``: position 0 feeds the record's 64 features to the MLP and its logits
predict the class; position 1 carries no loss (a zero output gradient) and is outside the
covariances' collection mask, so the loss, the gradients and the covariances are exactly the
MLP's cross-entropy ones. bergson calls ``model(input_ids)`` without an attention mask; T2's
batches are right-padded with pad labels -100, so a causal LM's real positions are unchanged.

Sign: bergson's score is ``(H^-1 g_query) . g_train`` with both gradients of the loss
(``ScoreConfig.higher_is_better=True`` in its own pipeline); up-weighting a train record moves
the parameters by ``-H^-1 g_train``, so a positive score means the record lowers the query
loss: **harmtrace's sign**, used as is (the writer's ``(n_train, n_query)`` is transposed).
Checked: on T2, queries that copy 10 train passages rank their copy first (last if the sign
were flipped); on T1, copies of 30 train records rank their copy at median 9 of 1,000 (0 to
152: EK-FAC's inner product favours high-loss records), the same ranks as kronfluence's
EK-FAC, whose scores these match at a per-query Pearson correlation of 0.97.

Not used, and why: bergson's CLI pipelines (``bergson hessian``/``build``/``score``, and
``approximate_hessians``/``hessian_pipeline`` in Python) load the model and tokenizer with
``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` and the data set by name, so they
would need T2 saved to a folder and cannot take T1's MLP at all; the calls above are the
workers those pipelines run, given the model and a ``datasets.Dataset`` directly.
:class:`bergson.Attributor` needs a gradient index on disk and concatenates the per-batch
query gradients of a trace along the feature axis, so it would need every query in one
backward pass; the streaming ``Scorer`` avoids both.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from benchmarks.lds.tasks import BenchTask

__all__ = ["bergson_scores"]

BATCH = 64  # records per forward/backward pass
DAMPING = 0.1  # x the mean eigenvalue of each module (MATCHED)


class _TableLM(torch.nn.Module):
    """T1's MLP as a causal "LM": ``input_ids`` index ``features``; see the docstring."""

    def __init__(self, net: torch.nn.Module, features: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("features", features)

    @property
    def base_model(self) -> torch.nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=self.net(self.features[input_ids]))  # (N, S, C)


def _prepare(bench: BenchTask, model: torch.nn.Module):
    """The model bergson sees and the train/query rows ``{"input_ids", "labels"}``."""
    model = copy.deepcopy(model).float().eval()
    if bench.name == "T1":
        examples = list(bench.train) + list(bench.queries)
        features = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in examples])
        rows = [{"input_ids": [i, i], "labels": [-100, int(y)]}
                for i, (_, y) in enumerate(examples)]
        return _TableLM(model, features), rows[: len(bench.train)], rows[len(bench.train):]
    if not hasattr(model, "base_model"):
        raise TypeError("bergson drives Hugging Face causal LMs; this model has no base_model")

    def row(example) -> dict:
        if isinstance(example, dict):
            return {"input_ids": list(example["input_ids"]),
                    "labels": list(example.get("labels", example["input_ids"]))}
        return {"input_ids": list(example), "labels": list(example)}

    return model, [row(e) for e in bench.train], [row(e) for e in bench.queries]


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{**r, "length": len(r["input_ids"])} for r in rows])


def _batches(n: int) -> list[list[int]]:
    return [list(range(s, min(s + BATCH, n))) for s in range(0, n, BATCH)]


def bergson_scores(bench: BenchTask, model: torch.nn.Module, clock,
                   method: str = "ekfac") -> np.ndarray:
    """Pairwise bergson EK-FAC influence ``(n_query, n_train)``, harmtrace's sign."""
    if method != "ekfac":
        raise ValueError(f"unknown bergson method {method!r}; only 'ekfac' is wired")
    from bergson import GradientProcessor, IndexConfig, InMemoryCollector, Scorer
    from bergson.collector.collector import CollectorComputer
    from bergson.config import HessianConfig, InversionConfig
    from bergson.hessians.hessian_approximations import fit_factored_hessians
    from bergson.hessians.preconditioner import load_preconditioner
    from bergson.score.score_writer import InMemorySequenceScoreWriter

    torch.manual_seed(0)
    lm, train_rows, query_rows = _prepare(bench, model)
    train_ds, query_ds = _dataset(train_rows), _dataset(query_rows)

    with tempfile.TemporaryDirectory() as tmp:
        def config(name: str) -> IndexConfig:
            cfg = IndexConfig(run_path=str(Path(tmp) / name), projection_dim=0,
                              include_bias=True, loss_reduction="sum")
            cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
            return cfg

        def run(collector, data, cfg: IndexConfig) -> None:
            CollectorComputer(model=lm, data=data, collector=collector,
                              batches=_batches(len(data)), cfg=cfg
                              ).run_with_collector_hooks(desc="bergson")

        with clock.fit():
            hessian_cfg = config("hessian")
            fit_factored_hessians(lm, train_ds, hessian_cfg,
                                  HessianConfig(method="kfac", ev_correction=True),
                                  target_modules=None, attention_cfgs={},
                                  batches=_batches(len(train_ds)),
                                  path=str(hessian_cfg.partial_run_path),
                                  do_eigendecomposition=True)
            preconditioner = load_preconditioner(
                hessian_cfg.partial_run_path, ev_correction=True, power=-1.0,
                inversion_cfg=InversionConfig(inversion="damped_inverse",
                                              damping_factor=DAMPING))

        with clock.score():
            processor = GradientProcessor(include_bias=True)
            query_cfg = config("query")
            collector = InMemoryCollector(model=lm.base_model, data=query_ds, cfg=query_cfg,
                                          processor=processor)
            run(collector, query_ds, query_cfg)
            queries = preconditioner.apply(collector.gradients)
            modules = list(queries)
            writer = InMemorySequenceScoreWriter(len(train_ds), len(query_ds))
            scorer = Scorer(queries, modules, writer, torch.device("cpu"), torch.float32)
            train_cfg = config("train")
            collector = InMemoryCollector(model=lm.base_model, data=train_ds, cfg=train_cfg,
                                          processor=processor, scorer=scorer)
            run(collector, train_ds, train_cfg)
            scores = writer.scores.double().numpy().T  # (n_query, n_train)
    return scores
