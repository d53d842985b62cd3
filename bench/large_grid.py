#!/usr/bin/env python
"""BackdoorBench scale through the whole engine: plan the leaderboard-shaped grid (12 attacks x 16
defenses x 5 ratios x 4 models x 4 datasets) and run its first 11,492 cells (676 attack cells, each
with its 16 defenses: BackdoorBench's 11,492 evaluations) with no-op cells, on one local Ray
instance. Prints plan time, total time, per-cell overhead against bare Ray Tune trials run in the
same process, and the driver's RSS when 1k, 5k and all cells have finished (it must stay flat).

    .venv/bin/python bench/large_grid.py                          # 11,492 cells, ~20 min on 2 cores
    .venv/bin/python bench/large_grid.py --cells 2040 --keep runs/large   # smaller; keep the folder
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine_overhead import peak_rss_mb, rss_mb, run_bare  # noqa: E402

GRID = """
name: large-grid
datasets: [cifar10, cifar100, gtsrb, tiny]
models: [preactresnet18, vgg19_bn, convnext_tiny, vit_b_16]
attacks: [badnet, blended, blind, bpp, inputaware, lc, lf, lira, sig, ssba, trojannn, wanet]
ratios: [0.1, 0.05, 0.01, 0.005, 0.001]
defenses: [ft, fp, nad, nc, anp, ac, spectral, abl, dbd, i_bau, clp, ft_sam, mcr, rnp, sau, npd]
"""
MILESTONES = (1000, 5000)


def plan_first(cells: int):
    """The leaderboard grid planned, then cut to its first attack cells with all their defenses
    (17 cells each) so that about `cells` cells remain."""
    from sweep.grid import expand, parse_grid

    full = expand(parse_grid(GRID))
    per_attack = 1 + len(full.defenses) // len(full.attacks)
    attacks = full.attacks[: max(1, round(cells / per_attack))]
    kept = {a.cell_id for a in attacks}
    return full, dataclasses.replace(full, attacks=attacks, defenses=[d for d in full.defenses if d.attack_cell_id in kept])


class DriverWatch:
    """Samples the driver's RSS and the number of finished cells (markers) twice a second."""

    def __init__(self, cells_dir: Path):
        self.cells_dir = cells_dir
        self.samples: list[tuple[float, int, float]] = []  # (seconds, finished cells, RSS MB)
        self.started = time.perf_counter()
        threading.Thread(target=self._run, daemon=True).start()

    def _finished(self) -> int:
        try:
            return sum(1 for entry in os.scandir(self.cells_dir) if entry.name.endswith(".json"))
        except FileNotFoundError:
            return 0

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter() - self.started, self._finished(), rss_mb()))
            time.sleep(0.5)

    def rss_at(self, finished: int) -> float | None:
        return next((rss for _, done, rss in self.samples if done >= finished), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=11492)
    parser.add_argument("--baseline-trials", type=int, default=1000, help="bare Tune trials for the baseline")
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep", default=None, help="run into this folder and keep it (bench/resume_cost.py reuses it)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray

    from sweep.runner import RunOptions, run_sweep

    ray.init(num_cpus=args.concurrency, log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep) if args.keep else Path(tmp) / "large"
        rss_start = rss_mb()
        started = time.perf_counter()
        full, plan = plan_first(args.cells)
        plan_s = time.perf_counter() - started
        watch = DriverWatch(out / "cells")
        run_started = time.perf_counter()
        outcome = run_sweep(plan, RunOptions(out=out, progress=False, max_concurrent=args.concurrency,
                                             executor="sweep.execute:noop_cell"))
        run_s = time.perf_counter() - run_started
        rss_end = rss_mb()
        bare_s = run_bare(args.baseline_trials, Path(tmp) / "bare", args.concurrency)
    ray.shutdown()
    n = plan.total_cells
    engine_ms, bare_ms = 1000 * run_s / n, 1000 * bare_s / args.baseline_trials
    report = {
        "full_grid_cells": full.total_cells, "cells": n, "attack_cells": len(plan.attacks),
        "statuses": outcome.statuses, "plan_s": round(plan_s, 2), "run_s": round(run_s, 1),
        "engine_ms_per_cell": round(engine_ms, 1), "bare_tune_ms_per_trial": round(bare_ms, 1),
        "ratio_over_bare_tune": round(engine_ms / bare_ms, 2),
        "driver_rss_mb": {"start": round(rss_start), **{f"at_{m}": watch.rss_at(m) for m in MILESTONES if m < n},
                          "at_end": round(rss_end), "peak": round(peak_rss_mb())},
    }
    report["driver_rss_mb"] = {k: None if v is None else round(v) for k, v in report["driver_rss_mb"].items()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    rss = report["driver_rss_mb"]
    print(f"leaderboard grid: {full.total_cells} cells planned in {plan_s:.1f} s; ran the first {n} "
          f"({len(plan.attacks)} attack cells + their defenses) with no-op cells, {args.concurrency} at a time")
    print(f"statuses: {outcome.statuses}")
    print(f"total run time {run_s:.0f} s = {engine_ms:.1f} ms/cell; bare Ray Tune {bare_ms:.1f} ms/trial "
          f"({args.baseline_trials} trials, same process): x{engine_ms / bare_ms:.2f}")
    print("driver RSS (MB): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in rss.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
