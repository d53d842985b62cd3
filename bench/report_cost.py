#!/usr/bin/env python
"""What `bdsweep report` costs against reading the same results with `load_results`, in the same
process: the synthetic BackdoorBench-sized table of bench/query_cost.py (N cells over 30 attacks x 30
defenses x 5 ratios), then the report (tables, heatmaps, ratio curves, every cell's configuration) is built
`--repeats` times and its median compared with the median `load_results` time.

    .venv/bin/python bench/report_cost.py [--rows 11492] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=11492)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from query_cost import write_table

    from sweep.report import build_report
    from sweep.results import load_results

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_table(out, args.rows)
        loads, reports = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            load_results(out)
            loads.append(time.perf_counter() - started)
            started = time.perf_counter()
            report = build_report(out)
            reports.append(time.perf_counter() - started)
        load, build = statistics.median(loads), statistics.median(reports)
        size = sum(p.stat().st_size for p in report.html.parent.rglob("*") if p.is_file())
        print(f"{args.rows} cells: load_results {load * 1000:.0f} ms, report {build:.2f} s (x{build / load:.0f}); "
              f"{len(report.images)} figures, {size / 1e6:.1f} MB on disk")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
