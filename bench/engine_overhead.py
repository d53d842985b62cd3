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


SAMPLES: list[float] = []


def sample_rss_forever() -> None:
    while True:
        SAMPLES.append(rss_mb())
        time.sleep(1)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_engine(n: int, out: Path, concurrency: int, shard_size: int,
               mlflow_uri: str | None = None) -> tuple[float, int, float, float]:
    from sweep.grid import expand, parse_grid
    from sweep.runner import RunOptions, run_sweep

    started = time.perf_counter()
    plan = expand(parse_grid(noop_grid(n)))
    rss_before = rss_mb()
    run_sweep(plan, RunOptions(out=out, max_concurrent=concurrency, progress=False, shard_size=shard_size,
                               executor="sweep.execute:noop_cell", mlflow_uri=mlflow_uri))
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
    import threading

    threading.Thread(target=sample_rss_forever, daemon=True).start()
    n = max(2, args.cells // 2) * 2
    # Two sizes: the slope is the per-cell cost, free of fixed start-up costs. --skip-bare (the
    # large memory run) runs the engine once, at full size.
    sizes = [n] if args.skip_bare else [n // 2, n]
    seconds: dict[str, list[float]] = {}
    rss: tuple[float, float] = (0.0, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_engine(2, tmp / "warm", args.concurrency, args.shard_size, "none")  # imports, worker start
        for size in sizes:
            if not args.skip_bare:
                seconds.setdefault("bare Tune", []).append(run_bare(size, tmp / f"bare{size}", args.concurrency))
                seconds.setdefault("engine, --mlflow-uri none", []).append(
                    run_engine(size, tmp / f"untracked{size}", args.concurrency, args.shard_size, "none")[0])
            elapsed, _, before, after = run_engine(size, tmp / f"engine{size}", args.concurrency, args.shard_size)
            seconds.setdefault("whole engine (MLflow sqlite)", []).append(elapsed)
            rss = (before, after)
    ray.shutdown()
    if len(sizes) == 1:
        total = seconds["whole engine (MLflow sqlite)"][0]
        print(f"whole engine: {sizes[0]} no-op cells in {total:.1f} s ({1000 * total / sizes[0]:.1f} ms/cell); "
              f"driver RSS {rss[0]:.0f} MB before, {rss[1]:.0f} MB after, peak {peak_rss_mb():.0f} MB")
        print("driver RSS over the run (MB, every 30 s): " + " ".join(f"{x:.0f}" for x in SAMPLES[::30]))
        return 0
    per_cell = {k: 1000 * (v[1] - v[0]) / (sizes[1] - sizes[0]) for k, v in seconds.items()}
    report = {
        "cells": sizes, "concurrency": args.concurrency,
        "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
        "marginal_ms_per_cell": {k: round(v, 2) for k, v in per_cell.items()},
        "driver_rss_mb": {"before_last_run": round(rss[0], 1), "after_last_run": round(rss[1], 1)},
    }
    if "bare Tune" in per_cell:
        report["ratio_over_bare_tune"] = {k: round(v / per_cell["bare Tune"], 2) for k, v in per_cell.items()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"engine overhead: no-op cells, {args.concurrency} concurrent, one process, one Ray instance")
    print(f"{'pipeline':<32}{'s @' + str(sizes[0]):>10}{'s @' + str(sizes[1]):>10}{'ms/cell':>10}{'ratio':>8}")
    for name, values in seconds.items():
        ratio = report.get("ratio_over_bare_tune", {}).get(name)
        print(f"{name:<32}{values[0]:>10.2f}{values[1]:>10.2f}{per_cell[name]:>10.1f}"
              f"{'' if ratio is None else f'{ratio:.2f}x':>8}")
    print("ms/cell = (time at the larger size - time at the smaller) / extra cells: fixed start-up costs excluded")
    print(f"driver RSS: {rss[0]:.0f} MB before the last engine run, {rss[1]:.0f} MB after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
