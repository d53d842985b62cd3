"""What every crash-recovery test checks on a sweep's output folder."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from sweep.layout import SweepLayout
from sweep.results import load_results


def mlflow_runs(out: Path, sweep: str) -> dict[str, list[str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs: dict[str, list[str]] = {}
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        return runs
    for run in client.search_runs([experiment.experiment_id], max_results=10000):
        runs.setdefault(run.data.tags.get("cell_id"), []).append(run.info.status)
    return runs


def check_sweep(out: Path, plan, reran: tuple[str, ...] = (), quarantined: bool = False) -> None:
    """One row, one marker and one finished MLflow run per planned cell; every Parquet file reads;
    every cell computed exactly once (the `reran` ones twice) and every attack trained."""
    ids = sorted([c.cell_id for c in plan.attacks] + [d.cell_id for d in plan.defenses])
    rows = load_results(out, latest_only=False)
    assert sorted(rows["cell_id"]) == ids
    assert (rows["status"] == "done").all(), rows[["cell_id", "status", "error"]]
    layout = SweepLayout(out)
    for path in [*layout.rows.glob("*.parquet"), *layout.data.glob("*.parquet")]:
        assert pq.read_table(path).num_rows > 0, path
    assert (out / "results" / "corrupt").exists() == quarantined
    runs = mlflow_runs(out, plan.name)
    assert {cid: statuses for cid, statuses in runs.items() if cid in ids} == {cid: ["FINISHED"] for cid in ids}
    counts = layout.execution_counts()
    assert sorted(cid for cid, _ in counts) == ids, counts
    assert {cid: n for (cid, _), n in counts.items() if n != 1} == {cid: 2 for cid in reran}, counts
    assert sorted(cid for cid, event in counts if event == "attack_trained") == sorted(c.cell_id for c in plan.attacks)


def check_invariants(out: Path) -> None:
    """What must hold at every instant, even right after a SIGKILL: nothing computed twice, every
    Parquet file readable, at most one MLflow run and one (latest) row per cell."""
    layout = SweepLayout(out)
    counts = layout.execution_counts()
    assert set(counts.values()) <= {1}, counts
    for path in [*layout.rows.glob("*.parquet"), *layout.data.glob("*.parquet")]:
        assert pq.read_table(path).num_rows > 0, path
    if layout.mlflow_db.exists():
        sweep = next(iter(layout.markers()), {"row": {}})["row"].get("sweep")
        if sweep:
            assert all(len(statuses) == 1 for statuses in mlflow_runs(out, sweep).values())
    rows = load_results(out)
    assert rows["cell_id"].is_unique
