#!/usr/bin/env python
"""What `bdsweep query` (DuckDB over the results) costs against reading the same table with
`load_results` and answering in pandas, in the same process: a synthetic BackdoorBench-sized results
table (N defense rows and their attack rows, some retried, compacted as a sweep leaves it) is written
once; then a leaderboard aggregate is answered both ways, alternately, and the median times compared.

    .venv/bin/python bench/query_cost.py [--rows 11492] [--repeats 5] [--json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SQL = ("SELECT attack, defense, avg(asr) AS asr, avg(acc) AS acc, count(*) AS n FROM results "
       "WHERE stage = 'defense' AND status = 'done' GROUP BY ALL ORDER BY ALL")


def write_table(out: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sweep.layout import SweepLayout
    from sweep.results import RESULTS_SCHEMA, compact

    rng = np.random.default_rng(0)
    attacks = [f"attack{i}" for i in range(30)]
    defenses = [f"defense{i}" for i in range(30)]
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    records = []
    for i in range(rows):
        stage = "attack" if i % 31 == 0 else "defense"
        for attempt in (1, 2) if i % 10 == 0 else (1,):  # every tenth cell retried: the later row wins
            records.append({
                "cell_id": f"c{i:06d}", "attack_cell_id": f"c{i - i % 31:06d}", "sweep": "bench", "stage": stage,
                "dataset": "cifar10", "model": "preactresnet18", "attack": attacks[i % 30],
                "ratio": float(rng.choice([0.001, 0.005, 0.01, 0.05, 0.1])), "label_mode": "all2one", "target": 0,
                "seed": 0, "defense": "none" if stage == "attack" else defenses[(i // 30) % 30],
                "acc": float(rng.random()), "asr": float(rng.random()), "ra": float(rng.random()),
                "status": "done", "wall_s": 1.0, "started_at": t0, "finished_at": t0 + dt.timedelta(seconds=i + attempt),
                "attack_params": "{}", "defense_params": "{}", "diagnostics": "{}", "attempts": attempt,
            })
    folder = SweepLayout(out).rows
    folder.mkdir(parents=True)
    chunk = 2000  # several files, as a sweep leaves several shards before compaction
    for start in range(0, len(records), chunk):
        part = [{name: r.get(name) for name in RESULTS_SCHEMA.names} for r in records[start:start + chunk]]
        pq.write_table(pa.Table.from_pylist(part, schema=RESULTS_SCHEMA), folder / f"part{start:07d}.parquet")
    compact(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=11492, help="cells (BackdoorBench's CIFAR-10 grid: 11,492)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from sweep.query import query_results
    from sweep.results import load_results

    def pandas_way(out: Path):
        df = load_results(out)
        df = df[(df.stage == "defense") & (df.status == "done")]
        return df.groupby(["attack", "defense"], as_index=False).agg(asr=("asr", "mean"), acc=("acc", "mean"),
                                                                    n=("asr", "size"))

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_table(out, args.rows)
        times: dict[str, list[float]] = {"pandas": [], "query": []}
        answers = {}
        for _ in range(args.repeats):
            for name, run in (("pandas", lambda: pandas_way(out)), ("query", lambda: query_results(out, SQL))):
                started = time.perf_counter()
                answers[name] = run()
                times[name].append(time.perf_counter() - started)
        groups = len(answers["query"])
        same = groups > 0 and len(answers["pandas"]) == groups and abs(
            answers["pandas"].asr.sum() - answers["query"].asr.sum()) < 1e-9
        medians = {name: statistics.median(t) for name, t in times.items()}
        ratio = medians["query"] / medians["pandas"]
        print(f"{args.rows} cells: load_results + pandas {medians['pandas'] * 1000:.0f} ms, "
              f"bdsweep query {medians['query'] * 1000:.0f} ms (x{ratio:.2f}); same answer ({groups} groups): {same}")
        if args.json:
            print(json.dumps({"rows": args.rows, "groups": groups, "medians_s": medians, "ratio": ratio, "same": same}))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
