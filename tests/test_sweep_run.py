"""End to end on real Ray Tune, real MLflow (sqlite) and real Parquet: a small grid runs, a
failing cell is reported while the others finish, a re-run repeats nothing, an edited grid runs
only its new cells, and a driver killed with SIGKILL mid-sweep loses and repeats nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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
    assert rows.loc[broken.cell_id, "attempts"] == 2  # retried once, then recorded
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


def test_killed_driver_resumes_without_losing_or_repeating(tmp_path, ray_address):
    out = tmp_path / "out"
    grid = tmp_path / "grid.yaml"
    # blended trains far longer than badnet: when badnet's cell finishes, blended is mid-training, and
    # a Ray worker orphaned by the kill cannot finish it before the cluster reaps it (with equal
    # lengths both attacks ended together and the "resumed" one could be completed by the orphan).
    grid.write_text(grid_text(name="killed", epochs=8)
                    + "overrides:\n  - match: {attack: blended}\n    train: {epochs: 30}\n")
    plan = expand(parse_grid(grid.read_text()))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "sweep.cli", "run", str(grid), "--out", str(out), "--address", ray_address, "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    layout = SweepLayout(out)
    deadline = time.time() + 240
    # Kill once the first cell has finished and another is training (a checkpoint on disk).
    while time.time() < deadline and proc.poll() is None:
        # An attack's checkpoint, not a defense's: only an attack killed mid-training shows its resume.
        if layout.finished_ids() and list((out / "work" / "attacks").rglob("checkpoint.safetensors")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = dict(layout.finished_ids())
    assert finished_before
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = check_complete(out, plan)
    assert (rows["status"] == "done").all()
    counts = layout.execution_counts()
    # No finished cell ran again, and no attack trained twice.
    assert all(n == 1 for n in counts.values()), counts
    assert sum(1 for k in counts if k[1] == "attack_trained") == len(plan.attacks)
    assert "killed" in done.stdout and "results (Parquet)" in done.stdout
    from bdcore.artifacts import read_metadata

    # The attack killed mid-training resumed from its epoch checkpoint instead of starting over.
    resumed = [read_metadata(p)["resumed_from_epoch"] for p in (out / "attacks").iterdir()]
    assert max(resumed) > 0, resumed
