"""MLflow tracking (real sqlite store): one run per cell, even after a driver died mid-logging."""
import json
import sqlite3

from sweep.tracking import PARENT_TAG, Tracker, default_uri, make_tracker


def marker(cell_id="c1", status="done", history=()):
    row = {"cell_id": cell_id, "attack_cell_id": cell_id, "stage": "attack", "dataset": "digits", "model": "smallcnn",
           "attack": "badnet", "defense": "none", "label_mode": "all2one", "status": status, "ratio": 0.1, "seed": 0,
           "target": 0, "attack_params": "{}", "defense_params": None, "acc": 0.9, "asr": 0.95, "ra": 0.04,
           "der": None, "rir": None, "wall_s": 3.0, "error": None if status == "done" else "ValueError: boom"}
    return {"row": row, "history": list(history)}


def runs_by_cell(tracker):
    counts = {}
    for run in tracker.client.search_runs([tracker.experiment_id], max_results=1000):
        cid = run.data.tags["cell_id"]
        counts[cid] = counts.get(cid, 0) + 1
    return counts


def test_one_run_per_cell_with_curves_and_parent(tmp_path):
    uri = default_uri(tmp_path)
    tracker = Tracker(uri, "s", tmp_path)
    run_id = tracker.log_cell(marker(history=[{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.0}]))
    run = tracker.client.get_run(run_id)
    assert run.data.metrics["asr"] == 0.95 and run.data.params["ratio"] == "0.1"
    assert run.data.tags["mlflow.parentRunId"] == tracker.parent_id and run.info.status == "FINISHED"
    curve = tracker.client.get_metric_history(run_id, "epoch_train_loss")
    assert [(m.step, m.value) for m in curve] == [(1, 2.0), (2, 1.0)]
    # A second driver over the same store reuses the parent and never duplicates a run.
    again = Tracker(uri, "s", tmp_path)
    assert again.parent_id == tracker.parent_id and again.is_tracked("c1")
    again.log_cell(marker(status="failed"))  # e.g. --retry-failed: same run, updated
    assert runs_by_cell(again) == {PARENT_TAG: 1, "c1": 1}
    db = sqlite3.connect(tmp_path / "mlflow.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_run_left_running_by_a_killed_driver_is_completed_not_duplicated(tmp_path):
    uri = default_uri(tmp_path)
    tracker = Tracker(uri, "s", tmp_path)
    # The driver died right after creating the child run: no metrics, status RUNNING.
    half = tracker.client.create_run(tracker.experiment_id, tags={"cell_id": "c2"}).info.run_id
    restarted = Tracker(uri, "s", tmp_path)
    assert not restarted.is_tracked("c2")
    assert restarted.log_cell(marker("c2")) == half
    assert restarted.client.get_run(half).info.status == "FINISHED"
    assert runs_by_cell(restarted)["c2"] == 1


def test_tracking_can_be_switched_off(tmp_path):
    tracker = make_tracker("none", "s", tmp_path)
    assert tracker.is_tracked("anything") and tracker.log_cell(marker()) is None
    assert not (tmp_path / "mlflow.db").exists()


def test_a_defense_cells_diagnostics_are_tracked(tmp_path):
    tracker = Tracker(default_uri(tmp_path), "s", tmp_path)
    m = marker("d1")
    m["row"].update(stage="defense", defense="nc", diagnostics=json.dumps(
        {"detected_targets": [3], "max_anomaly_index": 4.2, "flagged": True, "pruned_channels": 12}))
    run = tracker.client.get_run(tracker.log_cell(m))
    assert run.data.metrics["diag_max_anomaly_index"] == 4.2
    assert run.data.metrics["diag_pruned_channels"] == 12 and run.data.metrics["diag_flagged"] == 1
    assert json.loads(run.data.tags["diag_detected_targets"]) == [3]


def test_the_sqlite_shortcut_finds_the_same_runs_as_mlflow(tmp_path):
    """The resume reads (run, status, cell_id) straight from the store; it must agree with MLflow's
    own search, deleted runs and RUNNING ones included."""
    from sweep.tracking import _sqlite_cell_runs

    uri = default_uri(tmp_path)
    tracker = Tracker(uri, "s", tmp_path)
    for cell_id in ("c1", "c2", "c3"):
        tracker.log_cell(marker(cell_id))
    tracker.client.create_run(tracker.experiment_id, tags={"cell_id": "c4"})  # left RUNNING
    tracker.client.delete_run(tracker.runs["c3"])
    expected = {(run.info.run_id, run.info.status, run.data.tags["cell_id"])
                for run in tracker.client.search_runs([tracker.experiment_id], max_results=1000)}
    rows = _sqlite_cell_runs(uri, tracker.experiment_id)
    assert set(rows) == expected and len(rows) == 4  # c1, c2, c4 and the parent
    restarted = Tracker(uri, "s", tmp_path)
    assert restarted.is_tracked("c1") and not restarted.is_tracked("c4") and "c3" not in restarted.runs
