"""T3: the offensive-tweets scenario, measured by the log-probability of harmful generations.

The scenario of ``harmtrace demo --size small`` (five sources, a minority of offensive
tweets hidden in ``tweets-mixed``) runs through harmtrace's own pipeline stages (ingest,
train, measure) in a workspace under the cache. The queries are the harmful generations the
measure stage found; a query's loss is the summed NLL of its *focus tokens* (the words that
carry the harm), so ``-loss`` is the log-probability of the harmful words.

Two figures per method:

* **LDS** over subset models: random 50% subsets of the train records, each model trained
  with the pipeline's trainer, settings and seed; the query losses of each subset model;
* **AUPRC** of the method's mean score over queries against the hidden offensive labels
  (``scenario/ground_truth.jsonl``), which the methods never see; BM25 over the focus words
  is the lexical baseline the goal compares with.

Every registered pipeline method that applies runs through :func:`compute_scores` with the
inputs the attribute stage builds (TRAK with a 512-dimensional projection, see
:data:`T3_TRAK_DIM`; the ``exact`` mode does not apply: it needs a training short enough to
unroll). Peers run on T1
and T2 only: their adapters need a task in the benchmark's form and none of them has a
lexical baseline, so T3 compares harmtrace's methods with each other and with BM25.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np

__all__ = ["run_t3"]

#: methods of the pipeline's registry that T3 runs (in this order)
T3_METHODS = ("bm25", "gradcos", "graddot", "tracin", "ekfac", "kfac", "trak", "logra",
              "repsim", "tokeninf")


def _data_dir() -> Path:
    from harmtrace.datasets import locate_data

    data_dir, where = locate_data()
    if data_dir is None:
        raise SystemExit(f"T3 needs the public datasets ({where}); set HARMTRACE_DATA_DIR")
    return data_dir


def _prepare(cache: Path, log):
    """The pipeline with ingest, train and measure done (cached in the workspace)."""
    from harmtrace.config import load_config
    from harmtrace.pipeline import Pipeline
    from harmtrace.scenario.demo import prepare_demo

    workspace = (cache / "T3-workspace").resolve()
    _, config_path = prepare_demo(workspace, data_dir=_data_dir(), size="small")
    pipeline = Pipeline(load_config(config_path))
    for stage in ("ingest", "train", "measure"):
        start = time.perf_counter()
        getattr(pipeline, stage)()
        log(f"  T3: {stage} ready ({time.perf_counter() - start:.0f} s)")
    return pipeline


def _inputs(pipeline):
    """Train sequences, focused queries, LM examples of the queries, labels, texts."""
    import pandas as pd

    _, records = pipeline._records()
    tokenizer, models, _ = pipeline._load_models()
    generations = pd.read_parquet(pipeline.ws.artifact_dir("measure") / "generations.parquet")
    queries = pipeline._queries(generations[generations["harmful"]], tokenizer)
    examples = [{"input_ids": list(q.token_ids),
                 "labels": [t if m else -100 for t, m in zip(q.token_ids, q.target_mask,
                                                             strict=True)]}
                for q in queries]
    labels = np.asarray(pipeline._labels(records), dtype=int)
    return {"records": records, "tokenizer": tokenizer, "models": models,
            "train": pipeline._train_sequences(tokenizer, records), "queries": queries,
            "examples": examples, "labels": labels}


def _subset_losses(pipeline, data: dict, n_subsets: int, cache: Path, log):
    """Masks ``(n_subsets, n_train)`` and query losses ``(n_subsets, n_query)`` (cached)."""
    from benchmarks.lds.protocol import sample_subsets
    from benchmarks.lds.tasks import _losses

    from harmtrace.attribute.task import LMTask
    from harmtrace.hashing import sha256_json
    from harmtrace.models.lm import train_lm

    lm, seed = pipeline.config.train.lm, pipeline.config.train.seed
    masks = sample_subsets(len(data["train"]), n_subsets, fraction=0.5, seed=1)
    key = sha256_json({"train": data["train"], "queries": data["examples"],
                       "lm": repr(lm), "seed": seed})[:16]
    folder = cache / f"T3-subsets-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    task = LMTask(pad_id=data["tokenizer"].pad_token_id)
    losses = np.zeros((n_subsets, len(data["examples"])))
    spent, trained = 0.0, 0
    for s in range(n_subsets):
        path = folder / f"{s:04d}.npy"
        if path.exists():
            losses[s] = np.load(path)
            continue
        start = time.perf_counter()
        kept = [data["train"][j] for j in np.flatnonzero(masks[s])]
        model = train_lm(kept, data["tokenizer"], lm, seed=seed).model
        losses[s] = _losses(task, model, data["examples"], batch_size=64)
        np.save(path, losses[s])
        spent += time.perf_counter() - start
        trained += 1
        log(f"  T3 half: subset model {s + 1}/{n_subsets} trained "
            f"({time.perf_counter() - start:.1f} s)")
    return masks, losses, spent / max(trained, 1)


#: TRAK holds its projection matrix (n_params x k x 4 bytes): 512 keeps the scenario's
#: 0.67M-parameter model at 1.3 GiB (the pipeline's default 2048 would need 5.1 GiB)
T3_TRAK_DIM = 512


def _score(pipeline, data: dict, method: str) -> tuple[np.ndarray, float, float]:
    """Scores of one method, its wall time and the RSS high-water after it (MiB)."""
    import dataclasses

    from harmtrace.attribute.methods import compute_scores

    inputs = pipeline._attribution_inputs(data["records"], data["queries"],
                                          data["tokenizer"], data["models"])
    inputs = dataclasses.replace(inputs, progress=None, trak_projection_dim=T3_TRAK_DIM)
    start = time.perf_counter()
    scores = compute_scores(method, inputs)
    return scores, time.perf_counter() - start, _rss_mib()


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_t3(args, log) -> dict:
    """Rows for the table, the task's info and the goal's verdict; see the module docstring."""
    import torch
    from benchmarks.lds.harness import summarise

    from harmtrace.attribute.methods import method_names
    from harmtrace.attribute.rollup import auprc

    torch.set_num_threads(int(os.environ.get("LDS_THREADS", "2")))
    n_subsets = args.subsets or (8 if args.quick else 20)
    start = time.perf_counter()
    pipeline = _prepare(args.cache, log)
    data = _inputs(pipeline)
    masks, losses, per_run = _subset_losses(pipeline, data, n_subsets, args.cache, log)
    labels = data["labels"]
    info = {"task": "T3", "n_train": len(data["train"]), "n_query": len(data["queries"]),
            "description": (f"offensive-tweets scenario, small size (demo --size small), "
                            f"{int(labels.sum())} hidden offensive records; query = summed NLL "
                            "of a harmful generation's focus tokens"),
            "protocols": [{"name": "half", "seconds_per_training_run": per_run,
                           "text": (f"half: {n_subsets} random subsets (50% kept, subset seed "
                                    "1), one training run each with the pipeline's seed")}],
            "setup_s": time.perf_counter() - start, "base_rate": float(labels.mean())}

    rows = []
    wanted = args.methods.split(",") if args.methods else None
    for method in T3_METHODS:
        if method not in method_names():
            continue
        if wanted is not None and f"ht-{method}" not in wanted and method not in wanted:
            continue
        log(f"  T3: running {method}")
        row = {"task": "T3", "method": f"ht-{method}", "library": "harmtrace",
               "approximate": True, "description": f"pipeline method {method}"}
        try:
            scores, seconds, rss = _score(pipeline, data, method)
        except Exception as err:  # one method failing must not end the benchmark
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            rows.append(row)
            continue
        row.update({"fit_s": seconds, "score_s": 0.0, "total_s": seconds,
                    "peak_rss_mib": rss, "lds": {"half": summarise(scores, masks, losses)},
                    "auprc": auprc(scores, labels.tolist())})
        rows.append(row)
    return {"rows": rows, "info": info, "goal": _goal(rows, info["base_rate"])}


def _goal(rows: list[dict], base_rate: float) -> str:
    found = {r["method"]: r["auprc"] for r in rows if "auprc" in r}
    if "ht-bm25" not in found or len(found) < 2:
        return "not measured (bm25 or every other method failed: see the rows)"
    best = max((m for m in found if m != "ht-bm25"), key=found.get)
    ok = found[best] > found["ht-bm25"]
    listing = ", ".join(f"{m.removeprefix('ht-')} {v:.3f}" for m, v in found.items())
    return (f"{'HOLDS' if ok else 'FAILS'}: best model-based {best} AUPRC {found[best]:.3f} "
            f"vs bm25 {found['ht-bm25']:.3f} (base rate {base_rate:.3f}; all: {listing})")
