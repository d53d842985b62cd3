"""The output folder of a sweep, and the per-cell markers that make it crash-proof.

  DIR/sweep.json                      sweep name, MLflow parent run id, grid copy
  DIR/attacks/..., DIR/defenses/...   bdcore artifacts (see bdcore.cells)
  DIR/clean/..., DIR/analyses/...     clean reference models and analysis results (bdcore.reactivation.cells)
  DIR/cells/<cell_id>.json            one marker per finished cell: status done | failed | skipped,
                                      and its full result row; written atomically by the worker
  DIR/results/rows/*.parquet          one-row Parquet files, written atomically
  DIR/results/data/*.parquet          compacted Parquet dataset
  DIR/mlflow.db                       embedded MLflow tracking store (sqlite)
  DIR/grids/<name>/<version>.json     each run of a grid: its cells and the code fingerprint each
                                      is current with; the latest version of every grid is what
                                      results, query and report show by default
  DIR/code/<fingerprint>.json         the modules (digests, files) behind a code fingerprint
  DIR/superseded/<time>/...           artifacts of cells recomputed for changed code or --rerun
  DIR/pruned/<time>/...               rows, markers and artifacts `bdsweep prune` moved aside

A cell (attack, defense or analysis) is finished exactly when its marker exists with status "done" (or "skipped"); Tune's own
experiment snapshot is never trusted for that.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bdcore.atomic import atomic_write_json

# What the dormant-backdoor analyses (bdcore.reactivation) report; an analysis cell's row carries
# its own, and load_results() copies them onto the row of the defense cell it analysed. `_clean` /
# `_undefended`: the same budget applied to a clean model of the same training / to the
# backdoored model before the defense (controls).
ANALYSIS_METRICS: list[str] = [
    "bec", "bec_top5", "bec_top20",
    "asr_reactivated_wb", "asr_reactivated_wb_clean", "asr_reactivated_wb_undefended",
    "asr_reactivated_query", "asr_reactivated_query_clean", "asr_reactivated_query_undefended", "queries_used",
    "asr_reactivated_transfer", "asr_reactivated_transfer_clean", "asr_reactivated_transfer_undefended",
]

# Columns of the results table, in order (sweep.results writes and reads these).
ROW_COLUMNS: list[str] = [
    "cell_id", "attack_cell_id", "sweep", "stage", "dataset", "model", "attack", "ratio", "label_mode",
    "target", "seed", "defense", "acc", "asr", "ra", "der", "rir", "status", "error", "wall_s",
    "started_at", "finished_at", "artifact", "attack_params", "defense_params", "diagnostics", "attempts",
    "analysis", "parent_cell_id", *ANALYSIS_METRICS, "analysis_budget", "code",
]


def _ray_node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # outside Ray, or an older API: the audit line just lacks the node
        return None


class SweepLayout:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def cells(self) -> Path:
        return self.root / "cells"

    @property
    def rows(self) -> Path:
        return self.root / "results" / "rows"

    @property
    def data(self) -> Path:
        return self.root / "results" / "data"

    @property
    def sweep_file(self) -> Path:
        return self.root / "sweep.json"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def executions(self) -> Path:
        return self.root / "executions.jsonl"

    def log_execution(self, cell_id: str, event: str) -> None:
        """Append one line per real computation (an audit trail: a finished cell never reruns)."""
        import time

        entry = {"cell_id": cell_id, "event": event, "pid": os.getpid(), "node": _ray_node_id(), "time": time.time()}
        line = json.dumps(entry) + "\n"
        fd = os.open(self.executions, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one short O_APPEND write: lines never interleave
        finally:
            os.close(fd)

    def execution_counts(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        if self.executions.is_file():
            for line in self.executions.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                key = (entry["cell_id"], entry["event"])
                counts[key] = counts.get(key, 0) + 1
        return counts

    @property
    def grids(self) -> Path:
        return self.root / "grids"

    @property
    def code(self) -> Path:
        return self.root / "code"

    def write_code_records(self, records: dict[str, dict]) -> None:
        """Keep what each code fingerprint is made of (written once: a fingerprint never changes)."""
        for fingerprint, record in records.items():
            path = self.code / f"{fingerprint}.json"
            if not path.exists():
                atomic_write_json(path, record)

    def read_code_record(self, fingerprint: str | None) -> dict | None:
        if not fingerprint:
            return None
        try:
            record = json.loads((self.code / f"{fingerprint}.json").read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def record_grid_run(self, name: str, cells: dict[str, str | None], grid_text: str | None = None) -> int:
        """Record a run of grid `name` with its cells (cell id -> the code fingerprint it is current
        with); a new version only when they differ from the latest. Returns the version."""
        import time

        latest = self.latest_grid_run(name)
        if latest is not None and latest.get("cells") == cells:
            return int(latest["version"])
        version = 1 + (int(latest["version"]) if latest is not None else 0)
        atomic_write_json(self.grids / name / f"{version:06d}.json",
                          {"name": name, "version": version, "time": time.time(), "grid": grid_text, "cells": cells})
        return version

    def latest_grid_run(self, name: str) -> dict | None:
        folder = self.grids / name
        versions = sorted(folder.glob("[0-9]*.json")) if folder.is_dir() else []
        for path in reversed(versions):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # unreadable: the previous version stands
            if isinstance(record, dict) and isinstance(record.get("cells"), dict):
                return record
        return None

    def current_cells(self) -> dict[str, str | None] | None:
        """cell id -> code fingerprint over the latest version of every grid run here; None when no
        grid run is recorded (a folder written before grid records, or by write_row alone)."""
        if not self.grids.is_dir():
            return None
        current: dict[str, str | None] = {}
        for folder in sorted(p for p in self.grids.iterdir() if p.is_dir()):
            record = self.latest_grid_run(folder.name)
            if record is not None:
                current.update(record["cells"])
        return current

    def marker(self, cell_id: str) -> Path:
        return self.cells / f"{cell_id}.json"

    def read_marker(self, cell_id: str) -> dict | None:
        """The marker of a cell, or None when it has none (or an unreadable one: it reruns)."""
        try:
            marker = json.loads(self.marker(cell_id).read_text())
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) and isinstance(marker.get("row"), dict) else None

    def write_marker(self, cell_id: str, marker: dict) -> None:
        atomic_write_json(self.marker(cell_id), marker)

    def cell_lock(self, cell_id: str):
        """An exclusive lock held while a cell runs: a second process given the same cell (a worker
        orphaned by a killed driver, a trial retried elsewhere) waits, then finds its marker. The OS
        drops the lock with the process that held it, so a killed worker never leaves it stuck."""
        return exclusive_lock(self.cells / ".locks" / f"{cell_id}.lock")

    def invalidate_marker(self, cell_id: str, reason: str) -> None:
        """Set a marker aside (kept under cells/invalidated/ with the reason) so that its cell runs again."""
        import time

        path = self.marker(cell_id)
        marker = self.read_marker(cell_id)
        if marker is None:
            return
        marker["invalidated"] = {"reason": reason, "time": time.time()}
        atomic_write_json(self.cells / "invalidated" / f"{cell_id}-{int(time.time() * 1000)}.json", marker)
        path.unlink(missing_ok=True)

    def markers(self) -> Iterator[dict]:
        if not self.cells.is_dir():
            return
        for path in sorted(self.cells.glob("*.json")):
            try:
                marker = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(marker, dict) and isinstance(marker.get("row"), dict):
                yield marker  # anything else is not a marker (a damaged or foreign file): the cell reruns

    def finished_ids(self) -> dict[str, str]:
        """cell_id -> status for every cell with a readable marker."""
        return {m["row"]["cell_id"]: m["row"]["status"] for m in self.markers() if "row" in m}



@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """flock(LOCK_EX) on `path` for the duration; the OS releases it if the holder dies. The lock
    file itself is never deleted."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
