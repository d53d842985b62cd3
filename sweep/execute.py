"""Worker side: run one cell through bdcore and leave its marker.

A cell's marker (DIR/cells/<cell_id>.json, written atomically) holds its result row, its training
history and parameters; it is the single source of truth that the driver turns into Parquet rows
and MLflow runs, so a driver killed at any point loses nothing a worker finished.
"""
from __future__ import annotations

import json
import time
import traceback
from datetime import datetime, timezone
from typing import Any, Callable

from sweep.failpoints import failpoint
from sweep.layout import ANALYSIS_METRICS, SweepLayout

ATTACK_FAILED = "attack cell failed"
DEFENSE_NOT_DONE = "the defense cell it analyses did not finish (failed or skipped)"
# Skip reasons that come from an upstream cell: such a skip is redone when that cell reruns.
UPSTREAM_REASONS = (ATTACK_FAILED, DEFENSE_NOT_DONE)
# The audit line (DIR/executions.jsonl) each real computation leaves: a finished cell never reruns.
EXECUTION_EVENTS = {"attack": "attack_trained", "defense": "defense_ran", "analysis": "analysis_ran"}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def base_row(cell: dict, sweep: str) -> dict[str, Any]:
    spec = cell["spec"]
    return {
        "cell_id": cell["cell_id"],
        "attack_cell_id": cell["attack_cell_id"],
        "sweep": sweep,
        "stage": cell["kind"],
        "dataset": spec["dataset"],
        "model": spec["model"],
        "attack": spec["attack"],
        "ratio": float(spec["ratio"]),
        "label_mode": spec["label_mode"],
        "target": int(spec["target"]),
        "seed": int(spec["seed"]),
        "defense": cell.get("label", "none"),
        "acc": None, "asr": None, "ra": None, "der": None, "rir": None,
        "status": "failed",
        "error": None,
        "wall_s": 0.0,
        "started_at": now_iso(),
        "finished_at": None,
        "artifact": None,
        "attack_params": json.dumps(spec.get("attack_params", {}), sort_keys=True),
        "defense_params": (json.dumps(cell.get("defense", {}).get("params", {}), sort_keys=True)
                           if cell["kind"] != "attack" else None),
        "diagnostics": None,
        "attempts": 0,
        "analysis": cell["analysis"]["analysis"] if cell["kind"] == "analysis" else None,
        "parent_cell_id": cell["parent_cell_id"] if cell["kind"] == "analysis" else None,
        **{name: None for name in ANALYSIS_METRICS},
        "analysis_budget": None,
        "code": cell.get("code") or None,  # the code fingerprint the driver planned it with
    }


def skipped_marker(cell: dict, sweep: str, reason: str) -> dict:
    row = base_row(cell, sweep)
    row.update(status="skipped", error=reason, finished_at=now_iso())
    return {"row": row, "history": [], "traceback": None}


def run_cell(cell: dict, out_dir: str, sweep: str, device: str = "auto", work: Callable | None = None) -> dict:
    """Run an attack, defense or analysis cell (retrying up to cell['retries'] times) and write its marker.
    Returns the marker. A cell that already has a done/skipped marker is not run again, and the
    cell's lock keeps two processes from running it at once. `work` replaces the computation
    (default: bdcore's; the no-op and simulated executors below swap in their own)."""
    layout = SweepLayout(out_dir)
    with layout.cell_lock(cell["cell_id"]):
        existing = layout.read_marker(cell["cell_id"])
        if existing is not None and existing["row"]["status"] in ("done", "skipped"):
            return existing
        if cell["kind"] != "attack":
            parent = layout.read_marker(cell.get("parent_cell_id", cell["attack_cell_id"]))
            if parent is None or parent["row"]["status"] != "done":
                marker = skipped_marker(cell, sweep, ATTACK_FAILED if cell["kind"] == "defense" else DEFENSE_NOT_DONE)
                layout.write_marker(cell["cell_id"], marker)
                return marker
        marker = _attempts(cell, out_dir, sweep, device, work or _run_once)
        layout.write_marker(cell["cell_id"], marker)
        return marker


def _attempts(cell: dict, out_dir: str, sweep: str, device: str, work: Callable) -> dict:
    row = base_row(cell, sweep)
    started = time.perf_counter()
    history: list[dict] = []
    tb = None
    for attempt in range(1, int(cell.get("retries", 0)) + 2):
        row["attempts"] = attempt
        try:
            history = []
            work(cell, out_dir, device, row, history)
            tb = None
            break
        except Exception as exc:  # recorded, retried, then reported as failed: the sweep goes on
            if _is_skip(exc):  # a method that does not apply escaped its cell function: a skip, as there
                row.update(status="skipped", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                tb = None
                break
            # The whole first line (the full text is in the traceback kept in the marker).
            row.update(status="failed", error=(f"{type(exc).__name__}: {exc}".splitlines() or [""])[0])
            tb = traceback.format_exc()
            if _will_recur(exc):
                break  # the same input fails the same way: a retry would only repeat it
    row["wall_s"] = time.perf_counter() - started
    row["finished_at"] = now_iso()
    return {"row": row, "history": history, "traceback": tb}


def _is_skip(exc: Exception) -> bool:
    from bdcore.defenses import DefenseSkipped
    from bdcore.reactivation import NotApplicable

    return isinstance(exc, (DefenseSkipped, NotApplicable))


def _will_recur(exc: Exception) -> bool:
    """True for errors about the cell's input (a missing dataset, bad parameters, unusable weights,
    an unknown name, a damaged artifact): retrying reads the same input and fails the same way.
    One of them raised from an I/O error other than a missing or forbidden file (a flaky network
    file system) may pass on a retry, so it is retried."""
    from pydantic import ValidationError

    from bdcore.artifacts import ArtifactError
    from bdcore.data import DatasetError
    from bdcore.models import WeightsError
    from bdcore.registry import UnknownNameError

    if not isinstance(exc, (DatasetError, ValidationError, WeightsError, UnknownNameError, ArtifactError)):
        return False
    cause = exc.__cause__
    settled = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
    return not (isinstance(cause, OSError) and not isinstance(cause, settled))


def _run_once(cell: dict, out_dir: str, device: str, row: dict, history: list) -> None:
    from bdcore.cells import AttackCellSpec, DefenseCellSpec, attack_cell_dir, run_attack_cell, run_defense_cell

    spec = AttackCellSpec(**cell["spec"])

    def record(epoch: int, metrics: dict) -> None:
        history.append({"epoch": epoch, **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}})

    layout = SweepLayout(out_dir)
    if cell["kind"] == "attack":
        result = run_attack_cell(spec, out_dir, device=device, on_epoch_end=record)
        if result.reused and result.history:
            history.extend(result.history)
        else:
            layout.log_execution(cell["cell_id"], EXECUTION_EVENTS["attack"])
        m = result.metrics
        row.update(acc=m.acc, asr=m.asr, ra=m.ra, status="done", error=None, artifact=str(result.path))
        return
    if cell["kind"] == "analysis":
        _run_analysis(cell, out_dir, device, row, layout, attack_cell_dir(out_dir, spec))
        return
    defense = DefenseCellSpec(**cell["defense"])
    result = run_defense_cell(attack_cell_dir(out_dir, spec), defense, out_dir, device=device, on_epoch_end=record)
    if not result.reused:
        layout.log_execution(cell["cell_id"], EXECUTION_EVENTS["defense"])
    if result.status == "skipped":
        row.update(status="skipped", error=result.reason)
        return
    m = result.metrics
    row.update(acc=m.acc, asr=m.asr, ra=m.ra, der=result.scores["der"], rir=result.scores["rir"], status="done",
               error=None, artifact=str(result.path), diagnostics=json.dumps(result.diagnostics, sort_keys=True, default=str))


def _run_analysis(cell: dict, out_dir: str, device: str, row: dict, layout: SweepLayout, attack_dir) -> None:
    """One analysis of a finished defense cell; the other finished defense cells of the same attack
    cell are the surrogates a transfer analysis crafts on."""
    from bdcore.reactivation import NotApplicable
    from bdcore.reactivation.cells import AnalysisCellSpec, run_analysis_cell

    def artifact(cell_id: str) -> str | None:
        marker = layout.read_marker(cell_id)
        done = marker is not None and marker["row"]["status"] == "done"
        return marker["row"].get("artifact") if done else None

    defense_dir = artifact(cell["parent_cell_id"])
    surrogates = [path for path in map(artifact, cell.get("surrogates", [])) if path]
    try:
        result = run_analysis_cell(attack_dir, defense_dir, AnalysisCellSpec(**cell["analysis"]), out_dir,
                                   device=device, surrogate_dirs=surrogates)
    except NotApplicable as exc:
        row.update(status="skipped", error=str(exc))
        return
    if not result.reused:
        layout.log_execution(cell["cell_id"], EXECUTION_EVENTS["analysis"])
    columns = {k: v for k, v in result.columns.items() if k in ANALYSIS_METRICS}
    extra = {k: v for k, v in result.columns.items() if k not in ANALYSIS_METRICS}
    row.update(columns, status="done", error=None, artifact=str(result.path),
               analysis_budget=json.dumps(result.budget, sort_keys=True, default=str),
               diagnostics=json.dumps(extra, sort_keys=True, default=str) if extra else None)


def noop_cell(cell: dict, out_dir: str, sweep: str, device: str = "auto") -> dict:
    """An executor that computes nothing but goes through run_cell (lock, marker checks, marker):
    it measures the engine's own per-cell overhead in bench/engine_overhead.py and bench/large_grid.py."""
    return run_cell(cell, out_dir, sweep, device, work=_noop_work)


def _noop_work(cell: dict, out_dir: str, device: str, row: dict, history: list) -> None:
    row.update(status="done", error=None, acc=1.0, asr=0.0, ra=1.0)
    if cell["kind"] == "defense":
        row.update(der=0.5, rir=0.5)
    if cell["kind"] == "analysis":
        row.update(acc=None, asr=None, ra=None)
    SweepLayout(out_dir).log_execution(cell["cell_id"], f"{cell['kind']}_noop")



def simulated_cell(cell: dict, out_dir: str, sweep: str, device: str = "auto", epochs: int = 3,
                   epoch_seconds: float = 0.2) -> dict:
    """An executor that stands in for bdcore with the same crash behaviour and none of the compute
    (the chaos tests): `epochs` sleeps, an epoch checkpoint it resumes from, an artifact a defense
    cell needs from its attack cell, reuse of a complete artifact, and the same execution log."""
    def work(cell: dict, out_dir: str, device: str, row: dict, history: list) -> None:
        _simulated_work(cell, SweepLayout(out_dir), row, history, int(epochs), float(epoch_seconds))

    return run_cell(cell, out_dir, sweep, device, work=work)


def _simulated_work(cell: dict, layout: SweepLayout, row: dict, history: list, epochs: int, epoch_seconds: float) -> None:
    import torch

    from bdcore.artifacts import ArtifactError, read_metadata, save_artifact, verify_artifact
    from bdcore.atomic import atomic_write_json

    cell_id = cell["cell_id"]
    if cell["kind"] != "attack":  # like a real defense, it loads (and verifies) its parent's artifact
        parent = layout.read_marker(cell["parent_cell_id"] if cell["kind"] == "analysis" else cell["attack_cell_id"])
        verify_artifact(parent["row"]["artifact"] or "")
    artifact = layout.root / "simulated" / cell_id
    try:
        saved = verify_artifact(artifact)
    except ArtifactError:
        saved = None
    if saved is None:
        checkpoint = layout.root / "work" / "simulated" / f"{cell_id}.json"
        try:
            start = int(json.loads(checkpoint.read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            start = 0
        for epoch in range(start, epochs):
            time.sleep(epoch_seconds)
            atomic_write_json(checkpoint, {"epoch": epoch + 1})
            if cell["kind"] == "attack" and epoch == start:
                failpoint("attack_training")
        metrics = {"acc": 0.9, "asr": 0.95 if cell["kind"] == "attack" else 0.1, "ra": 0.5}
        save_artifact(artifact, {"weight": torch.full((4,), float(epochs))},
                      {"kind": "simulated", "cell_id": cell_id, "resumed_from_epoch": start, "metrics": metrics})
        saved = read_metadata(artifact)  # just written: no need to hash it again
        checkpoint.unlink(missing_ok=True)
        layout.log_execution(cell_id, EXECUTION_EVENTS[cell["kind"]])
    history.extend({"epoch": epoch, "train_loss": 1.0 / (epoch + 1)} for epoch in range(epochs))
    row.update(status="done", error=None, artifact=str(artifact))
    if cell["kind"] != "analysis":
        row.update(saved["metrics"])
    if cell["kind"] == "defense":
        row.update(der=0.9, rir=0.5)
