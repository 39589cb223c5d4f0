"""Orchestration: cached full and subset models, one child process per method, the table.

The cache (``benchmarks/lds/.cache/`` by default, git-ignored) holds, per task fingerprint,
the full model and one small ``.npy`` of query losses per subset model, so an interrupted
run resumes and a second run trains nothing. Each method runs in its own child process
(``run.py --worker``) so that its peak RSS (``resource.getrusage(...).ru_maxrss``) is its
own: the figure includes the interpreter, torch and the task's data (the ``base`` column is
the RSS high-water just before the method starts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from benchmarks.lds.protocol import bootstrap_ci, lds_per_query, sample_subsets
from benchmarks.lds.tasks import BenchTask, build_task

__all__ = ["Protocol", "full_model", "protocols_for", "run_method_child", "subset_losses",
           "worker_main"]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Protocol:
    """``n_subsets`` subsets keeping ``fraction`` of the train records, drawn with ``seed``."""

    name: str
    fraction: float
    n_subsets: int
    seed: int

    def describe(self) -> str:
        kept = f"{self.fraction:.0%} kept" if self.fraction >= 0.5 else f"{self.fraction:.0%}"
        return (f"{self.name}: {self.n_subsets} random subsets ({kept}, exactly "
                f"round(fraction * n_train) records each, subset seed {self.seed}), "
                "one training run each, every run with training seed 0")


def protocols_for(task: str, n_subsets: int) -> list[Protocol]:
    """The 50% protocol for every task; T1 adds leave-1%-out (subsets that drop 1%)."""
    found = [Protocol("half", 0.5, n_subsets, 1)]
    if task == "T1":
        found.append(Protocol("loo1", 0.99, n_subsets, 2))
    return found


def task_dir(cache: Path, task: BenchTask) -> Path:
    folder = cache / f"{task.name}-{task.fingerprint}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def full_model(task: BenchTask, cache: Path) -> torch.nn.Module:
    """The model trained on every train record (cached), with its checkpoints in
    ``task.extra["trajectory"]``: ``[(step, model)]`` in training order, the last being the
    trained model (T1: every :data:`T1_CHECKPOINT_EVERY` steps; T2: see
    :data:`T2_TRAJECTORY_CHECKPOINTS`), and the learning rate of every optimiser step in
    ``task.extra["step_lr"]``. T2 also keeps ``train_lm``'s own 3 checkpoints with their
    learning rates in ``task.extra["checkpoint_models"]`` (TracIn's input)."""
    folder = task_dir(cache, task)
    if task.name == "T1":
        path = folder / "full.pt"
        if path.exists():
            model = task.extra["factory"]()
            model.load_state_dict(torch.load(path, weights_only=True))
            model.eval()
        else:
            model = task.fit(np.ones(len(task.train), dtype=bool))
            torch.save(model.state_dict(), path)
        task.extra["trajectory"] = _t1_trajectory(task, folder, model)
        return model
    return _full_lm(task, folder)


#: Optimiser steps between T1's stored checkpoints (an epoch is 16 steps, training 64).
T1_CHECKPOINT_EVERY = 4


def _t1_trajectory(task: BenchTask, folder: Path, final: torch.nn.Module) -> list[tuple]:
    """``[(step, model)]`` of the full T1 training every :data:`T1_CHECKPOINT_EVERY` steps,
    the last being ``final``; cached in ``full-checkpoints.pt`` beside ``full.pt``. Also
    sets ``task.extra["step_lr"]``, the learning rate of every step.

    An intermediate checkpoint is the same training replayed for its first ``step`` steps
    (``ReplaySpec.batch_order`` = the prefix of the full run's order; the learning rate is
    constant), so neither the task's settings nor its fingerprint change.
    """
    from harmtrace.attribute.exact import train_weighted

    spec = task.extra["spec"]
    order = [tuple(int(i) for i in rows) for rows in spec.batches(len(task.train))]
    task.extra["step_lr"] = [spec.lr_at(k, len(order)) for k in range(len(order))]
    path = folder / "full-checkpoints.pt"
    if path.exists():
        states = torch.load(path, weights_only=True)
    else:
        ones = np.ones(len(task.train))
        states = {}
        for step in range(T1_CHECKPOINT_EVERY, len(order), T1_CHECKPOINT_EVERY):
            prefix = dataclasses.replace(spec, batch_order=tuple(order[:step]))
            model = train_weighted(prefix, task.extra["factory"], task.attr_task, task.train,
                                   ones)
            states[f"step-{step}"] = model.state_dict()
        torch.save(states, path)
    found = []
    for key, state in states.items():
        model = task.extra["factory"]()
        model.load_state_dict(state)
        found.append((int(key.split("-")[1]), model.eval()))
    return sorted(found, key=lambda pair: pair[0]) + [(len(order), final)]


def _full_lm(task: BenchTask, folder: Path) -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    final = folder / "full-lm"
    ckpt_dir = folder / "full-checkpoints"
    if not (final / "model.safetensors").exists():
        model = task.fit(np.ones(len(task.train), dtype=bool), out_dir=ckpt_dir)
        meta = [{"path": c.path, "lr": c.learning_rate} for c in task.extra["checkpoints"]]
        model.save_pretrained(final, safe_serialization=True)
        (folder / "checkpoints.json").write_text(json.dumps(meta), encoding="utf-8")
    meta = json.loads((folder / "checkpoints.json").read_text(encoding="utf-8"))
    task.extra["checkpoint_models"] = [
        (_eager(GPT2LMHeadModel.from_pretrained(m["path"])), float(m["lr"])) for m in meta]
    task.extra["trajectory"] = _lm_trajectory(task, folder)
    return _eager(GPT2LMHeadModel.from_pretrained(final))


#: Checkpoints of T2's trajectory: every 7 of its 126 steps.
T2_TRAJECTORY_CHECKPOINTS = 18


def _lm_trajectory(task: BenchTask, folder: Path) -> list[tuple]:
    """``[(step, model)]`` of the full T2 training, :data:`T2_TRAJECTORY_CHECKPOINTS` evenly
    spaced, cached under ``full-trajectory/``; also sets ``task.extra["step_lr"]``.

    The training is replayed with more checkpoints saved (``train_lm`` with the same data
    and seed; ``n_checkpoints`` only decides when to save), so the task's settings and
    fingerprint stay the same. The replay's final model is checked against ``full-lm``.
    """
    from transformers import GPT2LMHeadModel

    from harmtrace.models.lm import _lr_at, batch_order, train_lm

    lm = task.extra["lm"]
    total = len(batch_order(len(task.train), lm, seed=0))
    task.extra["step_lr"] = [_lr_at(k, total, lm) for k in range(total)]
    out = folder / "full-trajectory"
    index = out / "trajectory.json"
    if not index.exists():
        more = dataclasses.replace(lm, n_checkpoints=T2_TRAJECTORY_CHECKPOINTS)
        result = train_lm(task.train, task.extra["tokenizer"], more, seed=0, out_dir=out)
        final = GPT2LMHeadModel.from_pretrained(folder / "full-lm")
        drift = max(float((a - b).abs().max()) for a, b in zip(
            result.model.state_dict().values(), final.state_dict().values(), strict=True))
        if drift > 1e-5:
            raise RuntimeError(f"the replayed T2 training differs from full-lm by {drift:.2e}; "
                               f"delete {folder} to retrain both")
        meta = [{"step": c.step, "path": c.path} for c in result.checkpoints]
        index.write_text(json.dumps(meta), encoding="utf-8")
    meta = json.loads(index.read_text(encoding="utf-8"))
    return [(m["step"], _eager(GPT2LMHeadModel.from_pretrained(m["path"]))) for m in meta]


def _eager(model):
    model.config._attn_implementation = "eager"  # torch.func transforms need eager attention
    return model.eval()


def subset_losses(task: BenchTask, protocol: Protocol, cache: Path,
                  log=print) -> tuple[np.ndarray, np.ndarray, float]:
    """Masks ``(n_subsets, n_train)``, query losses ``(n_subsets, n_query)`` of the subset
    models, and the mean seconds per training run (0 when all were cached)."""
    masks = sample_subsets(len(task.train), protocol.n_subsets, fraction=protocol.fraction,
                           seed=protocol.seed)
    name = f"subsets-{protocol.name}-f{protocol.fraction}-s{protocol.seed}"
    folder = task_dir(cache, task) / name
    folder.mkdir(exist_ok=True)
    losses = np.zeros((protocol.n_subsets, len(task.queries)))
    spent, trained = 0.0, 0
    for s in range(protocol.n_subsets):
        path = folder / f"{s:04d}.npy"
        if path.exists():
            losses[s] = np.load(path)
            continue
        start = time.perf_counter()
        losses[s] = task.measure(task.fit(masks[s]))
        spent += time.perf_counter() - start
        trained += 1
        np.save(path, losses[s])
        log(f"  {task.name} {protocol.name}: subset model {s + 1}/{protocol.n_subsets} "
            f"trained ({time.perf_counter() - start:.1f} s)")
    return masks, losses, spent / max(trained, 1)


def summarise(scores: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> dict:
    """LDS (mean over queries), its 95% bootstrap interval and the number of queries."""
    per_query = lds_per_query(scores, masks, losses)
    low, high = bootstrap_ci(per_query)
    return {"lds": float(np.nanmean(per_query)), "ci": [low, high],
            "n_query": int(np.isfinite(per_query).sum())}


# -- child processes -----------------------------------------------------------------------


def run_method_child(task_name: str, method: str, *, cache: Path, quick: bool,
                     timeout: float) -> tuple[np.ndarray | None, dict]:
    """Run ``method`` on ``task_name`` in a fresh interpreter; scores and its metadata."""
    out = cache / "scores" / f"{task_name}-{method}"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks/lds/run.py"), "--worker", task_name, method,
           "--cache", str(cache), "--worker-out", str(out)]
    if quick:
        cmd.append("--quick")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, {"error": f"timed out after {timeout:.0f} s"}
    meta_path = out.with_suffix(".json")
    if proc.returncode != 0 or not meta_path.exists():
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return None, {"error": lines[-1][:200] if lines else f"exit code {proc.returncode}"}
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if "error" in meta:
        return None, meta
    return np.load(out.with_suffix(".npy")), meta


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker_main(task_name: str, method: str, *, cache: Path, quick: bool, out: Path) -> int:
    """Body of the child process: build the task, load the full model, score, write."""
    from benchmarks.lds.methods import METHODS, Clock

    torch.set_num_threads(int(os.environ.get("LDS_THREADS", "1")))
    task = build_task(task_name, quick=quick)
    model = full_model(task, cache)
    base = _rss_mib()
    clock = Clock()
    meta: dict = {"method": method, "library": METHODS[method].library}
    try:
        scores = np.asarray(METHODS[method].run(task, model, clock), dtype=np.float64)
        if scores.shape != (len(task.queries), len(task.train)):
            raise ValueError(f"adapter returned shape {scores.shape}, expected "
                             f"{(len(task.queries), len(task.train))}")
        if not np.isfinite(scores).all():
            raise FloatingPointError("adapter returned non-finite scores")
    except Exception as err:  # a peer failing must not crash the benchmark
        first = str(err).splitlines()[0][:180] if str(err) else ""
        meta["error"] = f"{type(err).__name__}: {first}" if first else type(err).__name__
        out.with_suffix(".json").write_text(json.dumps(meta), encoding="utf-8")
        return 0
    np.save(out.with_suffix(".npy"), scores)
    meta.update({"fit_s": clock.fit_s, "score_s": clock.score_s,
                 "total_s": clock.fit_s + clock.score_s, "peak_rss_mib": _rss_mib(),
                 "base_rss_mib": base, "notes": clock.notes})
    out.with_suffix(".json").write_text(json.dumps(meta), encoding="utf-8")
    return 0
