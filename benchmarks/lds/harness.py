"""Orchestration: cached full and subset models, one child process per method, the table.

The cache (``benchmarks/lds/.cache/`` by default, git-ignored) holds, per task fingerprint,
the full model and one small ``.npy`` of query losses per subset model, so an interrupted
run resumes and a second run trains nothing. Each method runs in its own child process
(``run.py --worker``) so that its peak RSS (``resource.getrusage(...).ru_maxrss``) is its
own: the figure includes the interpreter, torch and the task's data (the ``base`` column is
the RSS high-water just before the method starts).
"""

from __future__ import annotations

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
    """The model trained on every train record (cached; T2 also keeps its checkpoints)."""
    folder = task_dir(cache, task)
    if task.name == "T1":
        path = folder / "full.pt"
        if path.exists():
            model = task.extra["factory"]()
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        model = task.fit(np.ones(len(task.train), dtype=bool))
        torch.save(model.state_dict(), path)
        return model
    return _full_lm(task, folder)


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
    return _eager(GPT2LMHeadModel.from_pretrained(final))


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
