"""The LDS benchmark of harmtrace against peer attribution libraries: one command.

    python benchmarks/lds/run.py [--tasks T1,T2,T3] [--subsets 50] [--quick]
        [--methods ht-ekfac,...] [--peers kronfluence,...] [--cache DIR] [--out FILE]

Builds each task, trains the subset models once (cached), runs every method in its own
child process, and prints the table, the protocol and whether each goal holds. See
``benchmarks/lds/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

__all__ = ["main"]

DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="T1,T2,T3", help="comma-separated: T1, T2, T3")
    p.add_argument("--subsets", type=int, default=None,
                   help="subset models per protocol (default 50; 6 with --quick; T3: 8)")
    p.add_argument("--quick", action="store_true",
                   help="development size: 6 subsets and fewer queries")
    p.add_argument("--methods", default=None,
                   help="harmtrace methods to run (default: all that apply), e.g. ht-ekfac")
    p.add_argument("--peers", default=None,
                   help="peer libraries or peer method names (default: all); 'none' for none")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per method")
    p.add_argument("--worker", nargs=2, metavar=("TASK", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _selected(args: argparse.Namespace, task: str) -> list[str]:
    from benchmarks.lds.methods import METHODS

    def wanted(name: str) -> bool:
        method = METHODS[name]
        if method.library == "harmtrace":
            chosen = args.methods.split(",") if args.methods else None
            return (chosen is None and not (args.quick and method.slow)) or (
                chosen is not None and name in chosen)
        if args.peers is None:
            return not (args.quick and method.slow)
        chosen = args.peers.split(",")
        return name in chosen or (method.library in chosen and not (args.quick and method.slow))

    return [n for n, m in METHODS.items() if task in m.tasks and wanted(n)]


def _run_task(name: str, args: argparse.Namespace, log) -> tuple[list[dict], dict]:
    import torch
    from benchmarks.lds import harness
    from benchmarks.lds.methods import METHODS
    from benchmarks.lds.tasks import build_task

    torch.set_num_threads(1)  # tiny models: one thread is fastest and fair on shared cores
    n_subsets = args.subsets or (6 if args.quick else 50)
    task = build_task(name, quick=args.quick)
    start = time.perf_counter()
    harness.full_model(task, args.cache)
    data = {}
    info = {"task": name, "description": task.description, "n_train": len(task.train),
            "n_query": len(task.queries), "protocols": []}
    for proto in harness.protocols_for(name, n_subsets):
        masks, losses, per_run = harness.subset_losses(task, proto, args.cache, log=log)
        data[proto.name] = (masks, losses)
        info["protocols"].append({"name": proto.name, "text": proto.describe(),
                                  "seconds_per_training_run": per_run})
    info["setup_s"] = time.perf_counter() - start

    rows = []
    for method in _selected(args, name):
        log(f"  {name}: running {method}")
        scores, meta = harness.run_method_child(name, method, cache=args.cache,
                                                quick=args.quick, timeout=args.timeout)
        row = {"task": name, "method": method, "library": METHODS[method].library,
               "description": METHODS[method].description,
               "approximate": METHODS[method].approximate, **meta}
        if scores is not None:
            row["lds"] = {p: harness.summarise(scores, *d) for p, d in data.items()}
        rows.append(row)
    _add_ratios(rows)
    return rows, info


def _lds(row: dict, protocol: str = "half") -> float:
    return row.get("lds", {}).get(protocol, {}).get("lds", float("nan"))


def _best(rows: list[dict], library: str | None, *, exclude: str | None = None,
          approximate_only: bool = True) -> dict | None:
    pool = [r for r in rows if "lds" in r and (library is None or r["library"] == library)
            and (exclude is None or r["library"] != exclude)
            and (r["approximate"] or not approximate_only) and math.isfinite(_lds(r))]
    return max(pool, key=_lds) if pool else None


def _add_ratios(rows: list[dict]) -> None:
    """Each time over that of the best (by LDS) approximate harmtrace method of the task."""
    ref = _best(rows, "harmtrace")
    for row in rows:
        if ref is None or "total_s" not in row:
            continue
        row["reference"] = ref["method"]
        for key in ("fit_s", "score_s", "total_s"):
            base = ref[key]
            row[f"{key[:-2]}_ratio"] = row[key] / base if base > 0 else float("nan")


def _goals(rows: list[dict], t3: dict | None) -> list[tuple[str, str]]:
    out = []
    for task in ("T1", "T2"):
        ht = next((r for r in rows if r["task"] == task and r["method"] == "ht-ekfac"), None)
        kr = next((r for r in rows if r["task"] == task
                   and r["method"] == "kronfluence-ekfac"), None)
        if ht is None or kr is None or "lds" not in ht or "lds" not in kr:
            state = "not measured (a method did not run: see its row)"
        else:
            gap = _lds(ht) - _lds(kr)
            speed = kr["total_s"] / ht["total_s"]
            ok = gap >= -0.01 and speed >= 2.0
            state = (f"{'HOLDS' if ok else 'FAILS'}: LDS {_lds(ht):.3f} vs {_lds(kr):.3f} "
                     f"(gap {gap:+.3f}), kronfluence/harmtrace time {speed:.2f}x")
        goal = (f"{task}: harmtrace EK-FAC within 0.01 LDS of kronfluence (or better) "
                "and >= 2x faster end to end")
        out.append((goal, state))
    for task in ("T1", "T2"):
        mine = _best([r for r in rows if r["task"] == task], "harmtrace")
        peer = _best([r for r in rows if r["task"] == task], None, exclude="harmtrace")
        if mine is None or peer is None:
            state = "not measured"
        else:
            gap = _lds(mine) - _lds(peer)
            state = (f"{'HOLDS' if gap >= 0.05 else 'FAILS'}: {mine['method']} "
                     f"{_lds(mine):.3f} vs {peer['method']} {_lds(peer):.3f} (gap {gap:+.3f})")
        out.append((f"{task}: best harmtrace approximate method >= best peer + 0.05 LDS",
                     state))
    exact = next((r for r in rows if r["task"] == "T1" and r["method"] == "ht-exact"), None)
    if exact is None or "lds" not in exact:
        state = "not measured"
    else:
        value = _lds(exact, "loo1")
        state = f"{'HOLDS' if value >= 0.9 else 'FAILS'}: LDS {value:.3f} (leave-1%-out)"
    out.append(("T1: exact mode LDS >= 0.9 under leave-1%-out", state))
    out.append(("T3: AUPRC of the offensive records above the lexical baseline (bm25)",
                t3["goal"] if t3 else "not measured (T3 not run)"))
    return out


def _fmt(value, spec: str, empty: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return empty
    return format(value, spec)


def format_table(rows: list[dict]) -> str:
    """The result table as fixed-width text (one line per task x method)."""
    head = (f"{'task':4} {'method':20} {'library':11} {'LDS [95% CI]':22} {'LDS loo1':8} "
            f"{'AUPRC':>6} {'fit s':>7} {'score s':>7} {'peak MiB':>8} {'fit x':>6} {'score x':>7} "
            f"{'total x':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        left = f"{r['task']:4} {r['method']:20} {r['library']:11} "
        if "error" in r:
            lines.append(left + f"error: {r['error']}"[:160])
            continue
        half = r["lds"].get("half", {})
        ci = half.get("ci", [float("nan")] * 2)
        lds = f"{_fmt(half.get('lds'), '.3f')} [{_fmt(ci[0], '.3f')}, {_fmt(ci[1], '.3f')}]"
        loo = _fmt(r["lds"].get("loo1", {}).get("lds"), ".3f")
        found = _fmt(r.get("auprc"), "6.3f")
        lines.append(left + f"{lds:22} {loo:>8} {found:>6} {r['fit_s']:7.2f} {r['score_s']:7.2f} "
                     f"{r['peak_rss_mib']:8.0f} {_fmt(r.get('fit_ratio'), '6.2f'):>6} "
                     f"{_fmt(r.get('score_ratio'), '7.2f'):>7} "
                     f"{_fmt(r.get('total_ratio'), '7.2f'):>7}")
    return "\n".join(lines)


PROTOCOL = """Protocol
  LDS (Park et al. 2023): for each query i and subset S, predicted effect = sum of scores[i, j]
  over the records j in S; actual = the NEGATIVE query loss of the model trained on S only
  (harmtrace's sign: scores[i, j] > 0 means record j lowered query i's loss). LDS of query i =
  Spearman correlation over subsets; table value = mean over queries, 95% percentile
  bootstrap interval over queries (2,000 resamples). Every subset model is trained with the
  same training seed (same initialisation and batch order rule), so the subsets differ only
  in their data. 'half' = random subsets of 50% of the train set; 'loo1' (T1 only) = subsets
  that remove 1% of the train set (leave-1%-out), used for the exact-mode goal.
  fit s = train-side work (factors, train features); score s = query-side work and scoring;
  peak MiB = RSS high-water of the method's own child process (interpreter, torch and the
  task data included); ratios = time / that of the best (by LDS) approximate harmtrace
  method on the task. Threads: 1 per process (T3: 2, in the benchmark's own process).
  AUPRC (T3 only): the method's mean score over queries against the hidden offensive
  labels; the lexical baseline is bm25 over the harmful (focus) words."""


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker:
        from benchmarks.lds.harness import worker_main

        return worker_main(args.worker[0], args.worker[1], cache=args.cache,
                           quick=args.quick, out=args.worker_out)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows, infos, t3 = [], [], None
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        log(f"task {name}")
        if name == "T3":
            from benchmarks.lds.t3 import run_t3

            t3 = run_t3(args, log)
            _add_ratios(t3["rows"])
            rows.extend(t3["rows"])
            infos.append(t3["info"])
            continue
        task_rows, info = _run_task(name, args, log)
        rows.extend(task_rows)
        infos.append(info)

    print(PROTOCOL)
    for info in infos:
        print(f"\n{info['task']}: {info['description']}; {info['n_train']} train, "
              f"{info['n_query']} queries")
        for proto in info["protocols"]:
            print(f"  {proto['text']}")
    print()
    print(format_table(rows))
    goals = _goals(rows, t3)
    print("\nGoals (not tests)")
    for goal, state in goals:
        print(f"  - {goal}: {state}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"protocol": PROTOCOL, "tasks": infos, "rows": rows,
                                        "goals": dict(goals)}, indent=1, default=str),
                            encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
