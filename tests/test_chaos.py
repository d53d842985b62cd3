"""Chaos: real Ray, real MLflow (sqlite), real Parquet, drivers in subprocesses, SIGKILL at exact
moments (sweep.failpoints). A driver is killed at 5 points of one sweep and re-run each time, then a
worker is killed in the middle of a cell. After each: every cell has exactly one row, no finished
cell ran again, no attack trained twice, MLflow has one run per cell, and every Parquet file reads.
Then the same folder is damaged (a truncated artifact, a finished cell's artifact deleted, a
truncated Parquet file; then its MLflow store locked by another process): each is detected with
a clear message and repaired, re-run or refused before anything runs.

The cells run sweep.execute:simulated_cell: bdcore's crash behaviour (epoch checkpoints, resume,
artifacts a defense needs, the execution log) without its compute, so the whole test takes about
a minute. The 2-node cluster case is in test_sweep_cluster.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sweep_checks import check_invariants, check_sweep, mlflow_runs

from bdcore.artifacts import read_metadata
from sweep import failpoints
from sweep.cli import main
from sweep.grid import expand, parse_grid
from sweep.layout import SweepLayout

GRID = """
name: chaos
datasets: [digits]
models: [smallcnn]
attacks: [badnet, blended]
ratios: {ratios}
defenses: [ft, fp]
resources:
  attack: {{cpu: 1}}
  defense: {{cpu: 1}}
"""


class Driver:
    """`bdsweep run` in a subprocess on the session's Ray instance, with the simulated executor."""

    def __init__(self, tmp: Path, ray_address: str):
        self.tmp, self.out, self.grid = tmp, tmp / "out", tmp / "grid.yaml"
        self.cmd = [sys.executable, "-m", "sweep.cli", "run", str(self.grid), "--out", str(self.out),
                    "--address", ray_address, "--quiet", "--executor", "sweep.execute:simulated_cell",
                    "--executor-arg", "epoch_seconds=0.2", "--max-concurrent", "2"]

    def plan(self, ratios: str):
        self.grid.write_text(GRID.format(ratios=ratios))
        return expand(parse_grid(self.grid.read_text()))

    def start(self, point: str | None = None) -> tuple[subprocess.Popen, Path | None]:
        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        env.pop(failpoints.ENV, None)
        flag = None
        if point:
            flag = self.tmp / f"reached-{point}-{len(list(self.tmp.glob('reached-*')))}"
            env[failpoints.ENV] = f"{point}={flag}"
        return subprocess.Popen(self.cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), flag

    def kill_at(self, point: str) -> int:
        """Run until `point` is reached, SIGKILL the driver there; returns the pid that reached it."""
        proc, flag = self.start(point)
        deadline = time.time() + 180
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert flag.exists(), f"{point} never reached (rc {proc.poll()}): {proc.communicate()[1][-3000:]}"
        time.sleep(0.2)  # the flag is written first, then the process waits: it is there now
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check_invariants(self.out)
        return int(flag.read_text())

    def finish(self, proc: subprocess.Popen) -> tuple[str, str]:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        return stdout, stderr


def test_killed_driver_and_worker_lose_nothing_and_repeat_nothing(tmp_path, ray_address, capsys):
    driver = Driver(tmp_path, ray_address)
    plan = driver.plan("[0.1, 0.05]")
    layout = SweepLayout(driver.out)

    # 1. Mid-way through an attack's training (the worker is paused at its epoch checkpoint).
    driver.kill_at("attack_training")
    assert not layout.finished_ids()
    assert list((driver.out / "work" / "simulated").glob("*.json"))  # an epoch checkpoint is on disk

    # 2. A cell finished, its one-row Parquet file written, not yet compacted nor tracked.
    driver.kill_at("cell_recorded")
    assert layout.finished_ids() and list(layout.rows.glob("*.parquet"))

    # 3. While planning the resume (after the repairs, before Ray is asked for anything).
    driver.kill_at("planning")

    # 4. Inside MLflow logging: a child run created, still RUNNING, nothing logged to it.
    driver.kill_at("mlflow_logging")
    assert "RUNNING" in {s for statuses in mlflow_runs(driver.out, plan.name).values() for s in statuses}

    # 5. Inside compaction: the merged part written, its input files not yet deleted.
    driver.kill_at("compaction")
    assert list(layout.data.glob("*.parquet")) and list(layout.rows.glob("*.parquet"))

    stdout, _ = driver.finish(driver.start()[0])
    assert "sweep 'chaos': 12 cells (12 done)" in stdout
    check_sweep(driver.out, plan)
    resumed = [read_metadata(folder)["resumed_from_epoch"] for folder in (driver.out / "simulated").iterdir()]
    assert max(resumed) > 0  # the attack killed mid-training resumed from its checkpoint

    # 6. A worker killed in the middle of an attack cell (a new ratio's cells): Tune retries the
    # trial, the cell resumes from its checkpoint, and the driver finishes the sweep.
    bigger = driver.plan("[0.1, 0.05, 0.01]")
    proc, flag = driver.start("attack_training")
    deadline = time.time() + 180
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)
    worker = int(flag.read_text())
    assert worker != proc.pid
    os.kill(worker, signal.SIGKILL)
    stdout, _ = driver.finish(proc)
    assert "sweep 'chaos': 18 cells (18 done); ran 6 now, 12 were already finished" in stdout
    check_sweep(driver.out, bigger)

    damaged_files_are_detected_and_repaired(driver, bigger)
    a_locked_mlflow_store_stops_the_run_before_anything_runs(driver, capsys)


def damaged_files_are_detected_and_repaired(driver: Driver, plan) -> None:
    """A truncated artifact that a cell still to run needs, a finished cell whose artifact is gone,
    and a truncated Parquet file: each is reported, the two cells run again, the rows come back
    from the markers, and the damaged file and the old markers are kept aside."""
    layout = SweepLayout(driver.out)
    attack = plan.attacks[0].cell_id
    defense = [d.cell_id for d in plan.defenses if d.attack_cell_id == plan.attacks[1].cell_id][0]
    weights = Path(layout.read_marker(attack)["row"]["artifact"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.rmtree(layout.read_marker(defense)["row"]["artifact"])
    part = next(layout.data.glob("*.parquet"))
    part.write_bytes(part.read_bytes()[:100])

    # One more defense (nad) needs every attack artifact: the truncated one is caught before it runs.
    driver.grid.write_text(driver.grid.read_text().replace("defenses: [ft, fp]", "defenses: [ft, fp, nad]"))
    with_nad = expand(parse_grid(driver.grid.read_text()))
    stdout, stderr = driver.finish(driver.start()[0])
    assert "2 finished cell(s) lost their artifacts and run again" in stderr, stderr
    assert f"{attack}: artifact" in stderr and "is corrupted: model.safetensors" in stderr
    assert f"{defense}: artifact" in stderr and "is missing" in stderr
    assert f"unreadable results file {part}" in stderr
    assert len(list((layout.cells / "invalidated").glob("*.json"))) == 2
    assert [p.name for p in (layout.root / "results" / "corrupt").iterdir()][0].endswith(part.name)
    check_sweep(driver.out, with_nad, reran=(attack, defense), quarantined=True)


LOCKER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(120)
"""


def a_locked_mlflow_store_stops_the_run_before_anything_runs(driver: Driver, capsys) -> None:
    """In-process (`bdsweep run` through sweep.cli.main): the store is checked before Ray is asked for anything."""
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(driver.out / "mlflow.db")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        before = files(driver.out)
        driver.grid.write_text(driver.grid.read_text().replace("ratios: [0.1, 0.05, 0.01]", "ratios: [0.2]"))
        capsys.readouterr()
        assert main([*driver.cmd[3:], "--tracking-wait", "0.5"]) == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and error.startswith("bdsweep: error: MLflow store "), error
        assert "has been locked by another process" in error and "nothing was run" in error, error
        assert f"pid {locker.pid} (python)" in error, error
        assert files(driver.out) == before  # nothing ran, nothing changed
    finally:
        locker.kill()
        locker.wait()


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


RACER = """
import json, sys
from sweep.execute import simulated_cell
cell, out = json.loads(sys.argv[1]), sys.argv[2]
print(simulated_cell(cell, out, "race", epochs=3, epoch_seconds=0.3)["row"]["status"])
"""


def test_two_processes_given_the_same_cell_compute_it_once(tmp_path):
    """What a worker orphaned by a killed driver and the new run's worker do: both are handed the
    same unfinished cell. The cell's lock makes the second wait and then find its marker."""
    from sweep.runner import cell_payload

    plan = expand(parse_grid(GRID.format(ratios="[0.1]")))
    cell = json.dumps(cell_payload(plan.attacks[0], "attack"))
    out = tmp_path / "out"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, cell, str(out)], stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    assert [r.communicate(timeout=120)[0].strip() for r in racers] == ["done", "done"]
    assert SweepLayout(out).execution_counts() == {(plan.attacks[0].cell_id, "attack_trained"): 1}
