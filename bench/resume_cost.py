#!/usr/bin/env python
"""Resuming a finished sweep: the wall time of a fresh process that plans the grid and calls
run_sweep on a folder whose cells are all done (what `bdsweep run` does), against a fresh process
that only plans it (the same start-up, imports and planning). The folder comes from
bench/large_grid.py --keep DIR (11,492 finished no-op cells).

    .venv/bin/python bench/large_grid.py --keep runs/large     # once, ~20 min
    .venv/bin/python bench/resume_cost.py runs/large [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(out: Path, cells: int, resume: bool) -> None:
    from large_grid import plan_first

    _, plan = plan_first(cells)
    if resume:
        from sweep.runner import RunOptions, run_sweep

        outcome = run_sweep(plan, RunOptions(out=out, progress=False, executor="sweep.execute:noop_cell"))
        assert outcome.ran == 0 and outcome.already_finished == plan.total_cells, outcome


def timed(out: Path, cells: int, resume: bool) -> float:
    cmd = [sys.executable, __file__, str(out), "--child", "resume" if resume else "plan", "--cells", str(cells)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="a folder written by bench/large_grid.py --keep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cells", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["plan", "resume"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.dir)
    if args.child:
        child(out, args.cells, args.child == "resume")
        return 0
    cells = sum(1 for _ in (out / "cells").glob("*.json"))
    if not cells:
        sys.exit(f"{out}: no finished cells; run bench/large_grid.py --keep {out} first")
    plans, resumes = [], []
    for _ in range(args.repeats):
        plans.append(timed(out, cells, resume=False))
        resumes.append(timed(out, cells, resume=True))
    plan_s, resume_s = statistics.median(plans), statistics.median(resumes)
    print(f"resume of a sweep with {cells} finished cells: {resume_s:.1f} s (median of {args.repeats}: "
          f"{', '.join(f'{x:.1f}' for x in resumes)}); planning alone {plan_s:.1f} s "
          f"({', '.join(f'{x:.1f}' for x in plans)}); the resume itself {resume_s - plan_s:.1f} s, x{resume_s / plan_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
