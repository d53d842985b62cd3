"""Failures in plain sight: a resource request no node can meet is refused before any cell runs
(and --resources overrides it), trials waiting for resources show in the progress line, failed
cells are listed after a run with their whole first error line, `bdsweep status --traceback`
prints a stored traceback, errors that will recur are not retried, and a dead worker's error says
where Ray's logs are."""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from sweep.cli import main
from sweep.execute import _noop_work, _run_once, run_cell
from sweep.layout import SweepLayout

GRID = """
name: {name}
datasets: [digits]
models: [smallcnn]
attacks: [badnet, blended]
ratios: [0.1]
resources:
  attack: {{cpu: {cpu}, gpu: {gpu}}}
retries: 0
"""
LONG = "blended refused: " + "x" * 700  # longer than the 500 characters errors used to be cut to


def picky_cell(cell: dict, out_dir: str, sweep: str, device: str = "auto") -> dict:
    """The no-op executor, except that blended attack cells fail with a long first line and a second line."""
    def work(cell: dict, out_dir: str, device: str, row: dict, history: list) -> None:
        if cell["spec"]["attack"] == "blended":
            raise RuntimeError(LONG + "\nthe second line")
        _noop_work(cell, out_dir, device, row, history)

    return run_cell(cell, out_dir, sweep, device, work=work)


def write_grid(tmp_path: Path, name: str, cpu: float = 1, gpu: float = 0) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(GRID.format(name=name, cpu=cpu, gpu=gpu))
    return str(path)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ------------------------------------------------------------------------------ with Ray


@pytest.mark.timeout(180)  # without the check, the first run would wait for a GPU forever
def test_unmeetable_request_refused_then_overridden_and_failures_listed(tmp_path, ray_address, capsys):
    grid, out = write_grid(tmp_path, "gpu", gpu=0.5), tmp_path / "out"
    argv = ["run", grid, "--out", str(out), "--address", ray_address, "--mlflow-uri", "none", "--quiet"]
    started = time.monotonic()
    refused = ["run", grid, "--out", str(out), "--address", ray_address, "--quiet"]  # the default sqlite store
    assert main([*refused, "--executor", "sweep.execute:noop_cell"]) == 2
    assert time.monotonic() - started < 30
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1, err
    assert err[0].startswith("bdsweep: error: resources.attack: a trial asks for {cpu: 1, gpu: 0.5} but no node")
    assert "gpu: 0" in err[0] and "--resources attack.gpu=0" in err[0]
    assert not out.exists()  # refused before the folder, the tracking store or any marker was written

    assert main([*argv, "--resources", "attack.gpu=0", "--executor", "tests.test_sweep_failures:picky_cell"]) == 1
    captured = capsys.readouterr()
    statuses = sorted(m["row"]["status"] for m in SweepLayout(out).markers())
    assert statuses == ["done", "failed"]
    failed = [m["row"] for m in SweepLayout(out).markers() if m["row"]["status"] == "failed"][0]
    assert failed["error"] == "RuntimeError: " + LONG  # the whole first line, nothing after it
    assert failed["attempts"] == 1
    after_table = captured.out.split("failed cells (1):", 1)[1]
    assert f"{failed['cell_id']}  digits/smallcnn/blended" in after_table and LONG in after_table
    assert f"bdsweep status {out}" in after_table

    # bdsweep status: the whole error line and the marker; --traceback prints what the marker keeps
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RuntimeError: " + LONG in text and str(SweepLayout(out).marker(failed["cell_id"])) in text
    assert main(["status", str(out), "--traceback", failed["cell_id"]]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Traceback") and "the second line" in printed
    done = [m["row"]["cell_id"] for m in SweepLayout(out).markers() if m["row"]["status"] == "done"][0]
    for cell_id, says in ((done, "keeps no traceback (status done)"), ("0123abcd", "no such cell"),
                          ("../gpu", "not a cell id")):
        assert main(["status", str(out), "--traceback", cell_id]) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and says in err[0], err


def test_trials_waiting_for_resources_show_in_the_progress_line(tmp_path, ray_address, capsys):
    from sweep.grid import expand, parse_grid
    from sweep.runner import RunOptions, run_sweep

    # Each attack cell takes both CPUs of the test Ray: the second waits until the first is done.
    plan = expand(parse_grid(GRID.format(name="wait", cpu=2, gpu=0)))
    options = RunOptions(out=tmp_path / "out", mlflow_uri="none", max_concurrent=2, resource_wait_warning=0.3,
                         executor="sweep.execute:simulated_cell",
                         executor_args={"epochs": 2, "epoch_seconds": 1.0})
    outcome = run_sweep(plan, options)
    assert outcome.statuses == {"done": 2}
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[bdsweep]")]
    # (At the very start both may show as waiting: the first one's worker is still starting.)
    assert any("1 running, 1 waiting for resources (cpu 2 asked; free: cpu 0, gpu 0)" in line for line in lines), lines
    assert "waiting" not in lines[-1] and lines[-1].startswith("[bdsweep] 2/2 cells finished")


def test_dead_worker_error_names_trial_and_ray_logs(tmp_path, ray_address):
    from sweep.runner import Bookkeeper, CellSearcher, Progress
    from sweep.tracking import NullTracker

    cell = {"kind": "attack", "cell_id": "c0", "attack_cell_id": "c0", "retries": 0, "requires": [],
            "resources": {"cpu": 1, "gpu": 0},
            "spec": {"dataset": "digits", "model": "smallcnn", "attack": "badnet", "ratio": 0.1,
                     "label_mode": "all2one", "target": 0, "seed": 0}}
    layout = SweepLayout(tmp_path)
    books = Bookkeeper(layout, NullTracker(), Progress(1, 0, enabled=False))
    searcher = CellSearcher([cell], {}, {}, {"sweep": "dead", "out": str(tmp_path)}, books, max_concurrent=1)
    assert searcher.suggest("trial_0042")["cell"] is cell
    searcher.on_trial_complete("trial_0042", error=True)  # no marker: the worker died
    books.close()
    error = layout.read_marker("c0")["row"]["error"]
    assert "trial_0042" in error
    logs = error.split(" in ", 1)[1].split(" on the node", 1)[0]
    assert logs.endswith("logs") and Path(logs).is_dir() and any(Path(logs).glob("worker-*")), error


# ------------------------------------------------------------------------------ without Ray


def test_check_resources_names_stage_request_and_nodes():
    from sweep.runner import ResourceError, check_resources

    node = {"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9}}
    gpu_node = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}
    dead = {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}
    payloads = [{"kind": "attack", "resources": {"cpu": 1, "gpu": 0}},
                {"kind": "defense", "resources": {"cpu": 4, "gpu": 1}}]
    check_resources(payloads, [node, gpu_node])
    with pytest.raises(ResourceError) as info:
        check_resources(payloads, [node, node, dead])
    assert str(info.value) == ("resources.defense: a trial asks for {cpu: 4, gpu: 1} but no node has that "
                               "(nodes: 2 x {cpu: 2, gpu: 0}); lower it in the grid or override with "
                               "--resources defense.cpu=2 --resources defense.gpu=0")
    check_resources(payloads[:1], [node])  # only the stages with cells to run are checked


def test_progress_line_reports_trials_waiting_for_resources(monkeypatch, capsys):
    from sweep.runner import Progress

    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    progress = Progress(4, 0, enabled=True, wait_warning=60, free=lambda: {"CPU": 2.0, "memory": 1e9})
    progress.handed_out("t1", {"cpu": 1, "gpu": 0.5})
    progress.handed_out("t2", {"cpu": 1, "gpu": 0.5})
    progress.handed_out("t3", {"cpu": 1, "gpu": 0})
    progress.running = 3
    progress.trial_started("t3")
    clock[0] += 30
    progress.tick()
    assert "waiting" not in capsys.readouterr().err  # not yet past the threshold
    clock[0] += 31
    progress.tick()  # the waiting trials show at once, without waiting for a cell to finish
    line = capsys.readouterr().err
    assert "1 running, 2 waiting for resources (gpu 0.5 asked; free: cpu 2, gpu 0)" in line
    progress.trial_started("t1")
    progress.tick()
    assert "2 running, 1 waiting for resources" in capsys.readouterr().err


def test_failure_list_is_capped():
    from sweep.results import failure_lines

    entries = [{"cell_id": f"c{i}", "stage": "attack", "dataset": "digits", "model": "smallcnn", "attack": "badnet",
                "ratio": 0.1, "label_mode": "all2one", "seed": 0, "defense": "none", "error": f"E{i}", "attempts": 1}
               for i in range(25)]
    lines = failure_lines(entries, limit=20)
    assert len(lines) == 21 and lines[-1] == "  ... and 5 more" and lines[0].endswith(": E0")


def _attack_cell(retries: int, **spec) -> dict:
    from bdcore.cells import AttackCellSpec

    spec = AttackCellSpec(**{"dataset": "digits", "model": "smallcnn", "attack": "badnet", "ratio": 0.1, **spec})
    return {"kind": "attack", "cell_id": "c1", "attack_cell_id": "c1", "retries": retries, "requires": [],
            "resources": {"cpu": 1, "gpu": 0}, "spec": spec.model_dump()}


def test_missing_dataset_fails_once_with_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def counted(*args):
        calls.append(1)
        return _run_once(*args)

    marker = run_cell(_attack_cell(2, dataset="cifar10", model="preactresnet18", data_root="no-such-data"),
                      str(tmp_path / "out"), "s", device="cpu", work=counted)
    row = marker["row"]
    assert row["status"] == "failed" and row["attempts"] == 1 and len(calls) == 1
    assert row["error"].startswith("DatasetError: ") and str(tmp_path / "no-such-data") in row["error"]
    assert "DatasetError" in marker["traceback"]


def _raises(exc: Exception, times: int):
    """A work function that raises `exc` on its first `times` calls, then succeeds; counts calls."""
    def work(cell, out_dir, device, row, history):
        work.calls += 1
        if work.calls <= times:
            raise exc
        _noop_work(cell, out_dir, device, row, history)

    work.calls = 0
    return work


def _error_cases() -> list[tuple[str, Exception, int]]:
    """(what, the error a cell raises, the attempts it takes with retries: 2 when it raises once)."""
    from pydantic import BaseModel

    from bdcore.artifacts import ArtifactError
    from bdcore.data import DatasetError
    from bdcore.models import WeightsError
    from bdcore.registry import UnknownNameError

    class Strict(BaseModel):
        n: int

    try:
        Strict(n="x")
    except Exception as exc:
        invalid = exc
    # A dataset read that failed on an I/O error (a flaky network file system) may pass next time.
    flaky = DatasetError("/data/x.png: cannot read image")
    flaky.__cause__ = OSError(errno.EIO, "Input/output error")
    return [("unknown name", UnknownNameError("no attack 'badnot'"), 1),
            ("weights", WeightsError("weights file '/w.pt' does not fit"), 1),
            ("artifact", ArtifactError("artifact '/a' is corrupted"), 1),
            ("validation", invalid, 1),
            ("transient", RuntimeError("CUDA out of memory"), 2),
            ("dataset I/O", flaky, 2)]


def test_only_errors_that_may_pass_are_retried(tmp_path):
    for what, error, attempts in _error_cases():
        work = _raises(error, times=1)
        row = run_cell(_attack_cell(2), str(tmp_path / what), "s", work=work)["row"]
        expected = ("failed", 1, 1) if attempts == 1 else ("done", 2, 2)
        assert (row["status"], row["attempts"], work.calls) == expected, what


def test_a_skip_that_escapes_its_cell_is_a_skip_not_a_retried_failure(tmp_path):
    from bdcore.defenses import DefenseSkipped

    work = _raises(DefenseSkipped("fp prunes the last Conv2d layer and ViT has none"), times=5)
    marker = run_cell(_attack_cell(2), str(tmp_path), "s", work=work)
    row = marker["row"]
    assert (row["status"], row["attempts"], work.calls) == ("skipped", 1, 1)
    assert row["error"] == "fp prunes the last Conv2d layer and ViT has none" and marker["traceback"] is None
    assert os.path.isfile(SweepLayout(tmp_path).marker("c1"))
