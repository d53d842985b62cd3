#!/usr/bin/env python
"""Engine overhead per cell: the same N trivial cells through (a) a bare Ray Tune run and (b) the
whole engine (grid planning, the custom Searcher, atomic markers, Parquet rows and compaction,
MLflow runs), in one process on one Ray instance. Prints seconds per cell and the ratio.

    .venv/bin/python bench/engine_overhead.py                 # 200 cells
    .venv/bin/python bench/engine_overhead.py --cells 11492   # BackdoorBench scale: driver memory too
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def bare_trainable(config):
    from ray import tune

    tune.report({"ok": 1})


def run_bare(n: int, storage: Path, concurrency: int) -> float:
    from ray import tune

    started = time.perf_counter()
    tune.Tuner(
        bare_trainable,
        param_space={"i": tune.grid_search(list(range(n)))},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name="bare", storage_path=str(storage), verbose=0),
    ).fit()
    return time.perf_counter() - started


def noop_grid(n: int) -> str:
    # n cells = n/2 attack cells (seeds) + n/2 defense cells; the no-op executor runs none of them.
    seeds = list(range(max(1, n // 2)))
    return (f"name: overhead\ndatasets: [digits]\nmodels: [smallcnn]\nattacks: [badnet]\nratios: [0.1]\n"
            f"seeds: {seeds}\ndefenses: [ft]\n")


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_engine(n: int, out: Path, concurrency: int, shard_size: int) -> tuple[float, int, float, float]:
    from sweep.grid import expand, parse_grid
    from sweep.runner import RunOptions, run_sweep

    started = time.perf_counter()
    plan = expand(parse_grid(noop_grid(n)))
    rss_before = rss_mb()
    run_sweep(plan, RunOptions(out=out, max_concurrent=concurrency, progress=False, shard_size=shard_size,
                               executor="sweep.execute:noop_cell"))
    return time.perf_counter() - started, plan.total_cells, rss_before, rss_mb()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard-size", type=int, default=2000)
    parser.add_argument("--skip-bare", action="store_true", help="engine only (for the large memory run)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import ray

    ray.init(num_cpus=args.concurrency, log_to_driver=False, include_dashboard=False, logging_level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine_s, cells, rss_before, rss_after = run_engine(args.cells, tmp / "engine", args.concurrency,
                                                            args.shard_size)
        bare_s = None if args.skip_bare else run_bare(cells, tmp / "bare", args.concurrency)
    ray.shutdown()
    report = {
        "cells": cells, "concurrency": args.concurrency,
        "engine_s": round(engine_s, 2), "engine_ms_per_cell": round(1000 * engine_s / cells, 2),
        "bare_tune_s": None if bare_s is None else round(bare_s, 2),
        "bare_ms_per_cell": None if bare_s is None else round(1000 * bare_s / cells, 2),
        "ratio_engine_over_bare": None if bare_s is None else round(engine_s / bare_s, 2),
        "driver_rss_mb_before_run": round(rss_before, 1), "driver_rss_mb_after_run": round(rss_after, 1),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"engine overhead: {cells} no-op cells, {args.concurrency} concurrent, one process, one Ray instance")
    print(f"  whole engine : {engine_s:8.2f} s  ({report['engine_ms_per_cell']} ms/cell)")
    if bare_s is not None:
        print(f"  bare Tune    : {bare_s:8.2f} s  ({report['bare_ms_per_cell']} ms/cell, reuse_actors)")
        print(f"  ratio (engine / bare Tune): {engine_s / bare_s:.2f}x")
    print(f"  driver RSS: {rss_before:.0f} MB before the run, {rss_after:.0f} MB after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
