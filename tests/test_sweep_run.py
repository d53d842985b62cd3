"""End to end on real Ray Tune, real MLflow (sqlite) and real Parquet: a small grid runs, a
failing cell is reported while the others finish, a re-run repeats nothing, an edited grid runs
only its new cells, and a driver killed with SIGKILL mid-sweep loses and repeats nothing."""
from __future__ import annotations

from pathlib import Path

from sweep.grid import expand, parse_grid
from sweep.layout import SweepLayout
from sweep.results import load_results
from sweep.runner import RunOptions, run_sweep

GRID = """
name: {name}
datasets: [digits]
models: [smallcnn]
attacks:
  - badnet
  - blended
{extra_attacks}
ratios: {ratios}
defenses:
  - {{name: ft, params: {{epochs: 2, clean_fraction: 0.1}}}}
train: {{epochs: {epochs}}}
resources:
  attack: {{cpu: 1}}
  defense: {{cpu: 1}}
retries: 1
"""
BROKEN_ATTACK = "  - {name: badnet, params: {patch_image: /nonexistent/patch.png}}"


def grid_text(name="e2e", ratios="[0.1]", epochs=2, broken=False):
    return GRID.format(name=name, ratios=ratios, epochs=epochs, extra_attacks=BROKEN_ATTACK if broken else "")


def mlflow_cell_runs(out: Path, sweep: str) -> dict[str, int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(sweep)
    counts: dict[str, int] = {}
    for run in client.search_runs([exp.experiment_id], max_results=10000):
        cid = run.data.tags.get("cell_id")
        counts[cid] = counts.get(cid, 0) + 1
    return counts


def check_complete(out: Path, plan):
    """Every planned cell has exactly one row, one marker and one MLflow run."""
    rows = load_results(out, latest_only=False)
    ids = [c.cell_id for c in plan.attacks] + [d.cell_id for d in plan.defenses]
    assert sorted(rows["cell_id"]) == sorted(ids)
    runs = mlflow_cell_runs(out, plan.name)
    assert all(runs.get(i) == 1 for i in ids), runs
    return rows


def test_grid_runs_fails_cleanly_and_resumes_without_repeating(tmp_path, ray_address):
    out = tmp_path / "out"
    plan = expand(parse_grid(grid_text(broken=True)))
    assert len(plan.attacks) == 3 and len(plan.defenses) == 3
    outcome = run_sweep(plan, RunOptions(out=out, progress=False))
    rows = check_complete(out, plan).set_index("cell_id")
    broken = [c for c in plan.attacks if c.spec.attack_params.get("patch_image")][0]
    assert rows.loc[broken.cell_id, "status"] == "failed"
    assert "nonexistent" in rows.loc[broken.cell_id, "error"]
    assert rows.loc[broken.cell_id, "attempts"] == 1  # a missing file recurs: recorded without a retry
    assert SweepLayout(out).read_marker(broken.cell_id)["traceback"]
    skipped = [d for d in plan.defenses if d.attack_cell_id == broken.cell_id][0]
    assert rows.loc[skipped.cell_id, "status"] == "skipped"
    good = rows[rows["status"] == "done"]
    assert len(good) == 4 and set(good["defense"]) == {"none", "ft"}
    assert good["acc"].notna().all() and good[good["defense"] == "ft"]["der"].notna().all()
    assert outcome.statuses == {"done": 4, "failed": 1, "skipped": 1}
    counts = SweepLayout(out).execution_counts()
    trained = [k for k, n in counts.items() if k[1] == "attack_trained"]
    assert len(trained) == 2 and all(counts[k] == 1 for k in trained)  # each attack trained once

    # Re-run: nothing is computed again.
    again = run_sweep(plan, RunOptions(out=out, progress=False))
    assert again.ran == 0 and SweepLayout(out).execution_counts() == counts
    check_complete(out, plan)

    # --retry-failed runs the failed attack (and the defense it skipped) again, and nothing else;
    # MLflow still has one run per cell.
    retried = run_sweep(plan, RunOptions(out=out, progress=False, retry_failed=True))
    assert retried.ran == 2 and SweepLayout(out).execution_counts() == counts
    assert SweepLayout(out).read_marker(broken.cell_id)["row"]["finished_at"] > rows.loc[broken.cell_id, "finished_at"].isoformat()
    check_complete(out, plan)

    # Edit the grid: a new ratio runs only its new cells.
    bigger = expand(parse_grid(grid_text(ratios="[0.1, 0.05]", broken=True)))
    run_sweep(bigger, RunOptions(out=out, progress=False))
    new_counts = SweepLayout(out).execution_counts()
    assert {k: v for k, v in new_counts.items() if k in counts} == counts
    assert sum(1 for k in new_counts if k[1] == "attack_trained") == 4
    check_complete(out, bigger)
