"""Wall time and peak memory of each stage of the real run, printed as a table.

    python benchmarks/stages.py                 # full size (goal: under 20 minutes)
    python benchmarks/stages.py --size small    # the size CI checks

Each stage runs in its own process (``python -m harmtrace STAGE CONFIG --force``), so the
peak resident memory reported is that stage's alone. Needs HARMTRACE_DATA_DIR; without it
the built-in scenario is timed instead, and the table says so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harmtrace.datasets import locate_data
from harmtrace.pipeline import STAGES
from harmtrace.scenario.demo import prepare_demo

GOAL_SECONDS = 20 * 60


def run_stage(stage: str, config: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MiB, exit code) of one stage in a child process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "harmtrace", stage, str(config), "-q",
                             "--force"])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    return wall, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--workspace", default=None)
    args = parser.parse_args()
    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="harmtrace-bench-"))
    data_dir, where = locate_data()
    scenario, config = prepare_demo(workspace.resolve(), data_dir=data_dir, size=args.size)
    print(f"data: {where}\nscenario: {scenario.kind}, size {args.size}\nworkspace: {workspace}")
    rows, total = [], 0.0
    for stage in STAGES:
        wall, rss, code = run_stage(stage, config)
        total += wall
        rows.append((stage, wall, rss, code))
        print(f"  {stage} done in {wall:.1f} s", flush=True)
    print(f"\n{'stage':<10} {'wall s':>9} {'peak RSS MiB':>13} {'exit':>5}")
    for stage, wall, rss, code in rows:
        print(f"{stage:<10} {wall:>9.1f} {rss:>13.0f} {code:>5}")
    print(f"{'total':<10} {total:>9.1f}")
    if args.size == "full" and scenario.kind == "real":
        verdict = "met" if total < GOAL_SECONDS else "NOT met"
        print(f"goal: whole real run under {GOAL_SECONDS / 60:.0f} min on this machine: {verdict}")


if __name__ == "__main__":
    main()
