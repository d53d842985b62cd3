"""The results table of a sweep: one Parquet row per finished cell, compacted into a small dataset.

  DIR/results/rows/<cell_id>-<finished_at>-<rand>.parquet   one-row files, one per write_row()
  DIR/results/data/part-<timestamp>-<rand>.parquet          compacted parts (normally exactly one)
  DIR/results/corrupt/                                      unreadable files moved aside by compact()
  DIR/results/.compact.lock                                 flock'ed while compacting

Every Parquet file appears under its final name in one rename, after it was fully written and
fsync'ed under a dot-prefixed temporary name that no reader looks at, so a reader never sees a
partial file. The same cell may have rows in several files (a rerun, or a compaction that crashed
before deleting its inputs); readers keep the latest row per cell_id (latest `finished_at`, ties
go to the later file), so duplicates are harmless and nothing is ever lost by writing twice.
"""
from __future__ import annotations

import ast
import contextlib
import datetime as _dt
import json
import math
import os
import re
import secrets
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bdcore.atomic import fsync_dir
from sweep.failpoints import failpoint
from sweep.layout import ANALYSIS_METRICS, ROW_COLUMNS, SweepLayout, exclusive_lock

__all__ = [
    "RESULTS_SCHEMA", "ResultsFileWarning", "compact", "format_results", "format_status", "load_results",
    "pivot_note", "rebuild_rows_from_markers", "status_summary", "write_row",
]

_STR, _F64, _I64, _TS = pa.string(), pa.float64(), pa.int64(), pa.timestamp("us", tz="UTC")
_COLUMN_TYPES: dict[str, pa.DataType] = {
    "cell_id": _STR, "attack_cell_id": _STR, "sweep": _STR, "stage": _STR, "dataset": _STR,
    "model": _STR, "attack": _STR, "ratio": _F64, "label_mode": _STR, "target": _I64, "seed": _I64,
    "defense": _STR, "acc": _F64, "asr": _F64, "ra": _F64, "der": _F64, "rir": _F64, "status": _STR,
    "error": _STR, "wall_s": _F64, "started_at": _TS, "finished_at": _TS, "artifact": _STR,
    "attack_params": _STR, "defense_params": _STR, "diagnostics": _STR, "attempts": _I64,
    "analysis": _STR, "parent_cell_id": _STR,
    **{name: (_I64 if name == "queries_used" else _F64) for name in ANALYSIS_METRICS},
    "analysis_budget": _STR, "code": _STR,
}
if list(_COLUMN_TYPES) != list(ROW_COLUMNS):
    raise AssertionError(
        "sweep.results column types disagree with sweep.layout.ROW_COLUMNS: "
        f"only in ROW_COLUMNS {sorted(set(ROW_COLUMNS) - set(_COLUMN_TYPES))}, "
        f"only in results {sorted(set(_COLUMN_TYPES) - set(ROW_COLUMNS))}, or a different order")

# The table's Arrow schema, in ROW_COLUMNS order. Every field is nullable at the Arrow level (so
# files from any writer concatenate); write_row() itself refuses nulls in REQUIRED_COLUMNS.
RESULTS_SCHEMA: pa.Schema = pa.schema([pa.field(name, _COLUMN_TYPES[name]) for name in ROW_COLUMNS])

REQUIRED_COLUMNS: tuple[str, ...] = (
    "cell_id", "attack_cell_id", "sweep", "stage", "dataset", "model", "attack", "ratio", "label_mode",
    "target", "seed", "defense", "status", "finished_at", "attempts",
)
# Columns only analysis cells fill; rows written before they existed (markers of older sweeps) may lack them.
ANALYSIS_ONLY_COLUMNS: tuple[str, ...] = ("analysis", "parent_cell_id", *ANALYSIS_METRICS, "analysis_budget")
# Columns a row may lack because it was written before they existed (absent means null).
OPTIONAL_COLUMNS: tuple[str, ...] = (*ANALYSIS_ONLY_COLUMNS, "code")
JSON_COLUMNS: tuple[str, ...] = ("attack_params", "defense_params", "diagnostics", "analysis_budget")
METRIC_COLUMNS: tuple[str, ...] = ("acc", "asr", "ra", "der", "rir")
STAGES: tuple[str, ...] = ("attack", "defense", "analysis")
# Shown by the text formats next to DEFAULT_COLUMNS when a sweep ran these analyses.
ANALYSIS_SUMMARY_COLUMNS: tuple[str, ...] = ("bec", "asr_reactivated_wb", "asr_reactivated_query",
                                             "asr_reactivated_transfer")
STATUSES: tuple[str, ...] = ("done", "failed", "skipped")
FORMATS: tuple[str, ...] = ("table", "csv", "json", "markdown")
DEFAULT_COLUMNS: list[str] = [
    "dataset", "model", "attack", "ratio", "label_mode", "seed", "defense", "status",
    "acc", "asr", "ra", "der", "rir",
]

# One-row files: no compression, dictionaries, statistics or embedded Arrow schema; they only cost
# time to write and (much more) to read back, thousands at a time. Compacted parts use zstd.
_ROW_FILE_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": False, "store_schema": False}
_PART_OPTIONS = {"compression": "zstd"}
_STALE_TMP_SECONDS = 3600.0
_READ_RETRIES = 10


class ResultsFileWarning(UserWarning):
    """A results file could not be read (it is skipped; compact() moves it to results/corrupt/)."""


# ----------------------------------------------------------------------------------------------
# small helpers


def _results_dir(layout: SweepLayout) -> Path:
    return layout.root / "results"


def _corrupt_dir(layout: SweepLayout) -> Path:
    return _results_dir(layout) / "corrupt"


def _compact_utc(ts: _dt.datetime) -> str:
    ts = ts.astimezone(_dt.UTC)
    return ts.strftime("%Y%m%dT%H%M%S.") + f"{ts.microsecond:06d}Z"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _is_null(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    if isinstance(value, np.datetime64):
        return bool(np.isnat(value))
    return False


def _write_parquet_atomic(table: pa.Table, path: Path, **options: Any) -> Path:
    """Write `table` to `path` so that `path` is either absent or complete, never partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "xb") as handle:
            pq.write_table(table, handle, **options)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


# ----------------------------------------------------------------------------------------------
# writing one row


def _coerce(name: str, value: Any) -> Any:
    """One input value -> the Python value Arrow stores for column `name` (None for null)."""
    if _is_null(value):
        return None
    kind = _COLUMN_TYPES[name]
    if kind == _STR:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if name in JSON_COLUMNS and isinstance(value, (dict, list, tuple, int, float, bool)):
            return json.dumps(value, sort_keys=True, default=str)
        raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
    if kind == _F64:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if kind == _I64:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError(f"expected an integer, got bool {value!r}")
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
    if kind == _TS:
        if not isinstance(value, (str, _dt.datetime, np.datetime64)):
            raise TypeError(f"expected an ISO timestamp string or a datetime, got {type(value).__name__} {value!r}")
        try:
            ts = pd.Timestamp(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a timestamp: {value!r}") from exc
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        return ts.floor("us").to_pydatetime()
    raise AssertionError(f"unhandled column type {kind}")  # pragma: no cover


def _validate_row(row: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise TypeError(f"a result row must be a dict, got {type(row).__name__}")
    unknown = sorted(set(row) - set(ROW_COLUMNS), key=str)
    missing = [c for c in ROW_COLUMNS if c not in row and c not in OPTIONAL_COLUMNS]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown column(s) {unknown}")
        if missing:
            parts.append(f"missing column(s) {missing}")
        raise ValueError(f"result row for cell {row.get('cell_id')!r}: " + "; ".join(parts))
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name in ROW_COLUMNS:
        try:
            out[name] = _coerce(name, row.get(name))
        except (TypeError, ValueError) as exc:
            problems.append(f"{name}: {exc}")
    for name in REQUIRED_COLUMNS:
        if name in out and out[name] is None:
            problems.append(f"{name}: must not be null")
    if out.get("stage") is not None and out["stage"] not in STAGES:
        problems.append(f"stage: must be one of {list(STAGES)}, got {out['stage']!r}")
    if out.get("status") is not None and out["status"] not in STATUSES:
        problems.append(f"status: must be one of {list(STATUSES)}, got {out['status']!r}")
    if problems:
        raise ValueError(f"result row for cell {row.get('cell_id')!r}: " + "; ".join(problems))
    return out


def _file_stem(cell_id: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._=+-]", "_", cell_id).lstrip(".") or "cell"
    return stem[:120]


def write_row(out_dir: str | os.PathLike, row: Mapping[str, Any]) -> Path:
    """Validate one result row and write it as a one-row Parquet file under results/rows/.

    The file appears atomically (dot-prefixed temp name, fsync, rename, fsync of the folder).
    Timestamps may be ISO strings or datetimes (naive ones are taken as UTC); null metrics may be
    None or NaN; dict/list values of the JSON columns are serialised with json.dumps.
    Raises ValueError naming unknown/missing columns or bad values.
    """
    clean = _validate_row(row)
    table = pa.Table.from_pylist([clean], schema=RESULTS_SCHEMA)
    layout = SweepLayout(out_dir)
    name = f"{_file_stem(clean['cell_id'])}-{_compact_utc(clean['finished_at'])}-{secrets.token_hex(4)}.parquet"
    return _write_parquet_atomic(table, layout.rows / name, **_ROW_FILE_OPTIONS)


# ----------------------------------------------------------------------------------------------
# reading


def _conform(table: pa.Table) -> pa.Table:
    """A table read from any results file -> RESULTS_SCHEMA (cast; absent columns become null)."""
    table = table.replace_schema_metadata(None)
    if table.schema.equals(RESULTS_SCHEMA):
        return table
    if "cell_id" not in table.column_names:
        raise ValueError("not a results file: it has no cell_id column")
    columns = []
    for field in RESULTS_SCHEMA:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=RESULTS_SCHEMA)


def _read_file(path: Path) -> pa.Table:
    with open(path, "rb") as handle:
        data = handle.read()
    # use_threads only pays off for big files; for thousands of one-row files it costs ~2x.
    table = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False).read(use_threads=len(data) > (1 << 20))
    return _conform(table)


def _list_files(layout: SweepLayout) -> list[Path]:
    """Compacted parts (by name = by creation time), then row files (by mtime, then name).

    This order is the tie-break for rows with the same cell_id and finished_at: later wins."""
    parts: list[Path] = []
    rows: list[tuple[int, str, Path]] = []
    if layout.data.is_dir():
        with os.scandir(layout.data) as it:
            parts = sorted(Path(e.path) for e in it if e.name.endswith(".parquet") and not e.name.startswith("."))
    if layout.rows.is_dir():
        with os.scandir(layout.rows) as it:
            for entry in it:
                if not entry.name.endswith(".parquet") or entry.name.startswith("."):
                    continue
                try:
                    mtime = entry.stat().st_mtime_ns
                except FileNotFoundError:
                    continue  # compacted away meanwhile; its rows are in a newer part
                rows.append((mtime, entry.name, Path(entry.path)))
    return parts + [path for _, _, path in sorted(rows)]


class _Snapshot:
    def __init__(self, tables: list[tuple[Path, pa.Table]], bad: list[tuple[Path, BaseException]]):
        self.tables = tables  # readable files, in tie-break order
        self.bad = bad  # unreadable files and why


def _read_all(layout: SweepLayout) -> _Snapshot:
    """Read every results file in one pass (a small thread pool). A file that vanishes meanwhile
    means a compaction replaced it, so the listing is redone; unreadable files are reported."""
    workers = max(1, min(2, os.cpu_count() or 1))

    def attempt(path: Path) -> tuple[str, Any]:
        try:
            return "ok", _read_file(path)
        except FileNotFoundError as exc:
            return "gone", exc
        except Exception as exc:  # noqa: BLE001 - truncated / not Parquet / incompatible columns
            return "bad", exc

    for retry in range(_READ_RETRIES):
        paths = _list_files(layout)
        if not paths:
            return _Snapshot([], [])
        if len(paths) < 64 or workers == 1:
            outcomes = [attempt(p) for p in paths]
        else:  # one contiguous chunk per worker: thousands of futures would cost more than they save
            size = -(-len(paths) // workers)
            chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
            with ThreadPoolExecutor(workers) as pool:
                outcomes = [o for part in pool.map(lambda chunk: [attempt(p) for p in chunk], chunks) for o in part]
        gone = [p for p, (kind, _) in zip(paths, outcomes) if kind == "gone"]
        if gone and retry < _READ_RETRIES - 1:
            time.sleep(0.01 * (retry + 1))
            continue
        if gone:
            warnings.warn(f"results files kept vanishing while reading (concurrent compaction?), "
                          f"e.g. {gone[0]}; this read may be incomplete", ResultsFileWarning, stacklevel=3)
        tables = [(p, v) for p, (kind, v) in zip(paths, outcomes) if kind == "ok"]
        bad = [(p, v) for p, (kind, v) in zip(paths, outcomes) if kind == "bad"]
        return _Snapshot(tables, bad)
    raise AssertionError("unreachable")  # pragma: no cover


def _combine(snapshot: _Snapshot) -> tuple[pa.Table, np.ndarray]:
    """All rows in one table, and the file rank of every row (for the tie-break)."""
    if not snapshot.tables:
        return RESULTS_SCHEMA.empty_table(), np.zeros(0, dtype=np.int64)
    tables = [t for _, t in snapshot.tables]
    rank = np.repeat(np.arange(len(tables), dtype=np.int64), [t.num_rows for t in tables])
    return pa.concat_tables(tables), rank


def _latest_positions(table: pa.Table, rank: np.ndarray) -> np.ndarray:
    """Row positions of the latest row per cell_id (latest finished_at; ties: later file, later row)."""
    keys = pd.DataFrame({
        "cell_id": table.column("cell_id").to_pandas(),
        "finished_at": table.column("finished_at").to_pandas(),
        "rank": rank,
        "pos": np.arange(table.num_rows),
    })
    keys = keys[keys["cell_id"].notna()]
    keys = keys.sort_values(["finished_at", "rank", "pos"], na_position="first", kind="stable")
    return np.sort(keys.drop_duplicates("cell_id", keep="last")["pos"].to_numpy())


def _warn_unreadable(bad: Sequence[tuple[Path, BaseException]], action: str) -> None:
    for path, exc in bad:
        warnings.warn(f"unreadable results file {path} {action}: {type(exc).__name__}: {exc}",
                      ResultsFileWarning, stacklevel=3)


def _sort_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Order rows by dataset, model, attack, ratio, label_mode, target, seed, then defense with
    "none" (the attack cell's own row) first; finished_at and cell_id break remaining ties."""
    df = df.assign(_defense_rank=(df["defense"] != "none").astype(np.int8))
    keys = ["dataset", "model", "attack", "ratio", "label_mode", "target", "seed", "_defense_rank",
            "defense", "finished_at", "cell_id"]
    df = df.sort_values(keys, na_position="last", kind="stable")
    return df.drop(columns="_defense_rank").reset_index(drop=True)


def load_results(out_dir: str | os.PathLike, latest_only: bool = True, analyses: str = "merge",
                 scope: str = "current") -> pd.DataFrame:
    """The results table of a sweep as a DataFrame with ROW_COLUMNS, sorted for reading.

    Reads the compacted parts and the one-row files; unreadable files are skipped with a
    ResultsFileWarning naming them. With latest_only, one row per cell_id (the latest).
    analyses="merge" (with latest_only): the finished analysis cells' columns (bec,
    asr_reactivated_*, queries_used, analysis_budget as {analysis: budget}) are copied onto the row
    of the defense cell each analysed, and analysis rows are left out; "rows": every cell's own row.
    scope="current": only the cells of the latest run of each grid recorded in the folder, with the
    code they are current with (rows of edited-away cells and of stale code are left out; a folder
    with no grid record shows every row); "all": every row, and a boolean `current` column."""
    if analyses not in ("merge", "rows"):
        raise ValueError(f"analyses must be 'merge' or 'rows', got {analyses!r}")
    if scope not in ("current", "all"):
        raise ValueError(f"scope must be 'current' or 'all', got {scope!r}")
    layout = SweepLayout(out_dir)
    snapshot = _read_all(layout)
    _warn_unreadable(snapshot.bad, "skipped (compact() moves it to results/corrupt/)")
    table, rank = _combine(snapshot)
    if latest_only and table.num_rows:
        table = table.take(_latest_positions(table, rank))
    df = table.to_pandas()
    if df["cell_id"].isna().any():
        df = df[df["cell_id"].notna()]
    current = current_mask(df, layout.current_cells())
    df = df[current] if scope == "current" else df.assign(current=current)
    if analyses == "merge" and latest_only:
        df = _merge_analyses(df)
    return _sort_frame(df)[list(ROW_COLUMNS) + (["current"] if scope == "all" else [])]


def current_mask(df: pd.DataFrame, cells: dict[str, str | None] | None) -> np.ndarray:
    """Which rows belong to a current cell: its id is in `cells` and its code is the one recorded
    there (every row when `cells` is None: no grid run recorded)."""
    if cells is None:
        return np.ones(len(df), dtype=bool)
    ids = df["cell_id"].to_numpy(dtype=object)
    codes = df["code"].to_numpy(dtype=object)
    return np.fromiter((is_current(i, c, cells) for i, c in zip(ids, codes)), dtype=bool, count=len(df))


_ABSENT = object()


def is_current(cell_id: str, code: Any, cells: dict[str, str | None] | None) -> bool:
    """Whether a cell's row (its id and code fingerprint) is current (see current_mask)."""
    if cells is None:
        return True
    wanted = cells.get(cell_id, _ABSENT)
    return wanted is not _ABSENT and wanted == (None if _is_null(code) else code)


def _merge_analyses(df: pd.DataFrame) -> pd.DataFrame:
    """Defense rows with the columns of their finished analysis cells; analysis rows dropped."""
    is_analysis = (df["stage"] == "analysis").to_numpy()
    if not is_analysis.any():
        return df
    rows = df[~is_analysis].reset_index(drop=True)
    position = {cell_id: i for i, cell_id in enumerate(rows["cell_id"])}
    budgets: dict[int, dict[str, Any]] = {}
    done = df[is_analysis & (df["status"] == "done").to_numpy()]
    for record in done.to_dict(orient="records"):
        i = position.get(record["parent_cell_id"])
        if i is None:
            continue  # its defense row is not in the table (yet)
        for name in ANALYSIS_METRICS:
            if not _is_null(record[name]):
                rows.at[i, name] = record[name]
        budget = record["analysis_budget"]
        with contextlib.suppress(TypeError, ValueError):
            budget = json.loads(budget)
        budgets.setdefault(i, {})[str(record["analysis"])] = budget
    for i, used in budgets.items():
        rows.at[i, "analysis_budget"] = json.dumps(used, sort_keys=True)
        rows.at[i, "analysis"] = ",".join(sorted(used))
    return rows


# ----------------------------------------------------------------------------------------------
# compaction


def _remove_stale_tmp(folder: Path) -> None:
    """Temp files of writers that died mid-write (older than an hour, so never a live write)."""
    if not folder.is_dir():
        return
    cutoff = time.time() - _STALE_TMP_SECONDS
    for path in folder.glob(".*.parquet.tmp"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


def _quarantine(layout: SweepLayout, path: Path, exc: BaseException) -> None:
    dest_dir = _corrupt_dir(layout)
    dest = dest_dir / f"{path.parent.name}-{path.name}"
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest = dest_dir / f"{path.parent.name}-{path.stem}-{secrets.token_hex(4)}{path.suffix}"
        os.replace(path, dest)
        fsync_dir(dest_dir)
        fsync_dir(path.parent)
        where = f"moved to {dest}"
    except FileNotFoundError:
        return
    except OSError as move_exc:
        where = f"left in place (could not move it: {move_exc})"
    warnings.warn(f"unreadable results file {path} {where}: {type(exc).__name__}: {exc}. Rows of cells "
                  "whose markers exist can be restored with sweep.results.rebuild_rows_from_markers()",
                  ResultsFileWarning, stacklevel=3)


def _delete_inputs(paths: Sequence[Path]) -> None:
    """Remove the files merged into a new part (only called once that part is in place)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for folder in {p.parent for p in paths}:
        fsync_dir(folder)


def compact(out_dir: str | os.PathLike) -> int:
    """Merge results/rows/*.parquet and results/data/*.parquet into one new part, deduplicated to
    the latest row per cell_id, then delete the merged inputs. Returns the number of rows.

    Crash-safe: inputs are deleted only after the new part is durably in place, so at any instant
    every row is in some readable file (possibly twice; readers dedupe). Serialised across
    processes by flock on results/.compact.lock. Unreadable files are moved to results/corrupt/
    with a warning. Rows written while compaction runs are not touched (picked up next time)."""
    layout = SweepLayout(out_dir)
    try:
        return _compact_locked(layout)
    finally:
        # Reading many small files leaves freed buffers in Arrow's pool; hand them back so a long
        # sweep that compacts after every shard keeps a flat footprint.
        pa.default_memory_pool().release_unused()


def _compact_locked(layout: SweepLayout) -> int:
    with exclusive_lock(_results_dir(layout) / ".compact.lock"):
        _remove_stale_tmp(layout.rows)
        _remove_stale_tmp(layout.data)
        snapshot = _read_all(layout)
        for path, exc in snapshot.bad:
            _quarantine(layout, path, exc)
        if not snapshot.tables:
            return 0
        table, rank = _combine(snapshot)
        positions = _latest_positions(table, rank)
        inputs = [path for path, _ in snapshot.tables]
        if len(inputs) == 1 and inputs[0].parent == layout.data and len(positions) == table.num_rows:
            return table.num_rows  # already one deduplicated part: nothing to do
        merged = table.take(positions).sort_by([("cell_id", "ascending")])
        name = f"part-{_compact_utc(_now())}-{secrets.token_hex(4)}.parquet"
        _write_parquet_atomic(merged, layout.data / name, **_PART_OPTIONS)
        failpoint("compaction")
        _delete_inputs(inputs)
        return merged.num_rows


def move_rows(out_dir: str | os.PathLike, cell_ids: set[str], dest: Path) -> int:
    """Move every row of `cell_ids` out of the results table into the Parquet file `dest`; the rest is
    compacted into one new part. Returns how many rows moved. Crash-safe like compact(): `dest` is
    complete before the new part is written, and the inputs go only after both are in place."""
    import pyarrow.compute as pc

    layout = SweepLayout(out_dir)
    with exclusive_lock(_results_dir(layout) / ".compact.lock"):
        snapshot = _read_all(layout)
        if not snapshot.tables:
            return 0
        table, _ = _combine(snapshot)
        leaving = pc.is_in(table.column("cell_id"), value_set=pa.array(sorted(cell_ids), type=pa.string()))
        moved = table.filter(leaving)
        if not moved.num_rows:
            return 0
        _write_parquet_atomic(moved, dest, **_PART_OPTIONS)
        kept = table.filter(pc.invert(leaving))
        name = f"part-{_compact_utc(_now())}-{secrets.token_hex(4)}.parquet"
        _write_parquet_atomic(kept, layout.data / name, **_PART_OPTIONS)
        _delete_inputs([path for path, _ in snapshot.tables])
        return moved.num_rows


def rebuild_rows_from_markers(out_dir: str | os.PathLike) -> int:
    """Write a result row for every cell marker (DIR/cells/*.json) whose cell_id has no row in the
    results table, e.g. after compact() quarantined a corrupt file. Returns how many were written.
    Markers whose row does not validate are reported with a warning and skipped."""
    layout = SweepLayout(out_dir)
    present = set(load_results(out_dir, latest_only=True, analyses="rows", scope="all")["cell_id"])
    written = 0
    for marker in layout.markers():
        row = marker.get("row") if isinstance(marker, dict) else None
        if not isinstance(row, dict) or row.get("cell_id") is None or row["cell_id"] in present:
            continue
        try:
            write_row(out_dir, row)
        except (TypeError, ValueError) as exc:
            warnings.warn(f"marker of cell {row['cell_id']!r}: row not rebuilt: {exc}", ResultsFileWarning,
                          stacklevel=2)
            continue
        present.add(row["cell_id"])
        written += 1
    return written


# ----------------------------------------------------------------------------------------------
# formatting


# The columns that tell one result from another; a pivot cell that mixes several values of one of
# them is an aggregate over that axis, and format_results says so.
IDENTITY_COLUMNS: tuple[str, ...] = ("dataset", "model", "attack", "ratio", "label_mode", "target", "seed",
                                     "defense", "analysis")
PIVOT_AGGS: tuple[str, ...] = ("mean", "median", "min", "max", "count")
_COMPARE_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
_QUOTED = re.compile(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


def _is_metric_name(name: str) -> bool:
    return name in METRIC_COLUMNS or name.startswith(("bec", "asr_reactivated"))


def _numbers(node: ast.AST) -> list[float]:
    """The number literals a comparison operand is: 50, or the items of [50, 60] (for `in`)."""
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [v for item in node.elts for v in _numbers(item)]
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return [float(node.value)]
    return []


def _check_metric_scale(where: str) -> None:
    """Refuse `asr < 50`: metrics are fractions, so a percent literal would quietly select all or nothing."""
    # pandas gives & and | the precedence of and/or; Python would parse `asr < 50 & x` as `asr < (50 & x)`.
    # Backticks quote column names in pandas; Python does not know them.
    parts = _QUOTED.split(where.strip())
    text = "".join(p if i % 2 else re.sub(r"`(\w+)`", r"\1", p).replace("&", " and ").replace("|", " or ")
                   for i, p in enumerate(parts))
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return  # not Python (backticks, @variables) or simply bad: pandas reports it
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for left, op, right in zip(operands, node.ops, operands[1:]):
            for name, other in ((left, right), (right, left)):
                big = [v for v in _numbers(other) if v > 1]
                if not (isinstance(name, ast.Name) and _is_metric_name(name.id) and big):
                    continue
                fraction = f"{big[0] / 100:g}"
                if isinstance(other, ast.Constant) and type(op) in _COMPARE_TEXT:
                    terms = [name.id, _COMPARE_TEXT[type(op)], fraction]
                    fraction = " ".join(terms if name is left else terms[::-1])
                raise ValueError(f"bad where expression {where!r}: metrics are fractions in 0..1, not "
                                 f"percentages; use {fraction} for {big[0]:g}%")


def select_rows(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """The rows of `df` that a --where expression selects (ValueError, one line, when it is bad)."""
    _check_metric_scale(where)
    try:
        out = df.query(where)
    except Exception as exc:
        raise ValueError(
            f"bad where expression {where!r}: {type(exc).__name__}: {exc} (pandas query syntax, e.g. "
            f"\"attack == 'badnet' and asr > 0.5\"; columns: {', '.join(map(str, df.columns))})") from exc
    if not isinstance(out, pd.DataFrame):
        raise ValueError(f"bad where expression {where!r}: it does not select rows")  # noqa: TRY004
    return out


def is_percent_column(name: str) -> bool:
    """Columns that text formats print as percentages: the metrics and the re-activation ASRs."""
    return name in METRIC_COLUMNS or name.startswith("asr_reactivated")


def label_order(labels: Sequence[Any]) -> list[Any]:
    """Sorted labels with "none" (no defense) first; the given order if they do not sort."""
    labels = list(labels)
    try:
        return sorted(labels, key=lambda v: (v != "none", v))
    except TypeError:
        return labels


def _pivot(df: pd.DataFrame, pivot: Sequence[str], agg: str = "mean") -> pd.DataFrame:
    if agg not in PIVOT_AGGS:
        raise ValueError(f"unknown pivot aggregation {agg!r}; choose one of {', '.join(PIVOT_AGGS)}")
    if len(pivot) != 3:
        raise ValueError(f"pivot must be (rows, cols, value), got {pivot!r}")
    rows, cols, value = pivot
    unknown = [c for c in (rows, cols, value) if c not in df.columns]
    if unknown:
        raise ValueError(f"pivot: unknown column(s) {unknown}; columns: {', '.join(map(str, df.columns))}")
    if len({rows, cols, value}) != 3:
        raise ValueError(f"pivot: rows, cols and value must be three different columns, got {pivot!r}")
    if not pd.api.types.is_numeric_dtype(df[value]) or pd.api.types.is_bool_dtype(df[value]):
        raise ValueError(f"pivot: value column {value!r} is not numeric")
    if df.empty:
        return pd.DataFrame({rows: pd.Series([], dtype=object)})
    table = df.pivot_table(index=rows, columns=cols, values=value, aggfunc=agg, dropna=False,
                           observed=True, sort=False)
    table = table.reindex(index=label_order(table.index), columns=label_order(table.columns))
    if agg == "count":  # whole numbers; "-" (null) only where no row at all falls into the cell
        table = table.astype("Int64")
    table.columns = [str(c) for c in table.columns]
    table.index.name = rows
    return table.reset_index()


def pivot_note(df: pd.DataFrame, pivot: Sequence[str], agg: str = "mean", where: str | None = None) -> str | None:
    """One line naming what a pivot's cells aggregate over, or None when every cell holds at most one row.

    Names the IDENTITY_COLUMNS (other than the pivot's rows and cols) that take several values within
    some cell, with the most values one cell mixes, and rows that repeat another row's identity in
    their cell (e.g. two sweeps or parameter sets in one folder). df is filtered by where first, as in
    format_results, so the CLI can print the note of a csv/json pivot to stderr."""
    if where is not None and where.strip():
        df = select_rows(df, where)
    rows, cols, _ = pivot
    if df.empty or rows not in df.columns or cols not in df.columns:
        return None
    groups = df.groupby([rows, cols], dropna=False, observed=True, sort=False)
    most = int(groups.size().max())
    if most <= 1:
        return None
    axes = [c for c in IDENTITY_COLUMNS if c in df.columns and c not in (rows, cols)]
    spread = groups[axes].nunique(dropna=False).max() if axes else pd.Series(dtype="int64")
    over = [f"{c} ({int(n)} values)" for c, n in spread.items() if n > 1]
    what = f"each cell counts up to {most} rows" if agg == "count" else f"each cell is the {agg} of up to {most} rows"
    parts = [f"{what} over {', '.join(over)}" if over else what]
    repeated = int(df.duplicated(subset=[rows, cols, *axes], keep=False).sum())
    if repeated:
        parts.append(f"{repeated} rows repeat another row's identity ({'/'.join([rows, cols, *axes])}) in "
                     "their cell, e.g. two sweeps or parameter sets in one folder")
    parts.append(f"--agg picks {'|'.join(PIVOT_AGGS)}, --where narrows")
    return "note: " + "; ".join(parts)


def _cell_text(value: Any, percent: bool) -> str:
    if _is_null(value):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{100 * float(value):.2f}" if percent else f"{float(value):g}"
    if isinstance(value, (pd.Timestamp, _dt.datetime)):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return " ".join(str(value).splitlines())


def _text_grid(frame: pd.DataFrame, percent_columns: set[str], headers: list[str]
               ) -> tuple[list[str], list[list[str]], list[bool]]:
    right = [pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])
             for c in frame.columns]
    body = [[_cell_text(v, c in percent_columns) for v, c in zip(values, frame.columns)]
            for values in frame.itertuples(index=False, name=None)]
    return headers, body, right


def _render_table(headers: list[str], body: list[list[str]], right: list[bool]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    if not body:
        out.append("(no rows)")
    return "\n".join(out)


def _render_markdown(headers: list[str], body: list[list[str]], right: list[bool]) -> str:
    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")

    out = ["| " + " | ".join(esc(h) for h in headers) + " |",
           "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return "\n".join(out)


def _json_value(value: Any) -> Any:
    if _is_null(value):
        return None
    if isinstance(value, (pd.Timestamp, _dt.datetime)):
        return value.isoformat()
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def format_results(df: pd.DataFrame, fmt: str = "table", where: str | None = None,
                   pivot: tuple[str, str, str] | None = None, columns: list[str] | None = None,
                   agg: str = "mean") -> str:
    """Render a results DataFrame (as from load_results) as text.

    fmt: "table" (aligned plain text), "csv", "json" (a list of records) or "markdown".
    where: a pandas DataFrame.query expression selecting rows (ValueError when it is bad, or when it
    compares a metric with a number above 1: metrics are fractions).
    pivot: (rows, cols, value), e.g. ("attack", "defense", "asr"): agg (one of PIVOT_AGGS) of value per
    pair. When a cell holds several rows, table/markdown end with pivot_note()'s line naming the axes.
    columns: the columns to show (default: DEFAULT_COLUMNS for table/markdown, all for csv/json).
    Metrics (is_percent_column) print as percentages with 2 decimals in table/markdown, their headers
    marked "%", and as raw fractions under their plain names in csv/json. No trailing newline."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if where is not None and where.strip():
        df = select_rows(df, where)
    text_format = fmt in ("table", "markdown")
    if pivot is not None:
        if columns:
            raise ValueError("columns cannot be combined with pivot")
        frame = _pivot(df, pivot, agg)
        as_percent = is_percent_column(pivot[2]) and agg != "count"
        percent = set(frame.columns[1:]) if as_percent else set()
        # The value columns are labels (e.g. defenses), so the corner header names the value and its unit.
        value = f"count of {pivot[2]}" if agg == "count" else f"{pivot[2]} %" if as_percent else str(pivot[2])
        value = value if agg in ("mean", "count") else f"{agg} {value}"
        headers = [f"{pivot[0]} \\ {pivot[1]} ({value})"] + [str(c) for c in frame.columns[1:]]
    else:
        if columns:
            unknown = [c for c in columns if c not in df.columns]
            if unknown:
                raise ValueError(f"unknown column(s) {unknown}; columns: {', '.join(map(str, df.columns))}")
            selected = list(columns)
        elif text_format:
            selected = [c for c in DEFAULT_COLUMNS if c in df.columns]
            selected += [c for c in ANALYSIS_SUMMARY_COLUMNS if c in df.columns and df[c].notna().any()]
        else:
            selected = list(df.columns)
        frame = df[selected]
        percent = {c for c in selected if is_percent_column(c)}
        headers = [f"{c} %" if c in percent else str(c) for c in selected]
    if fmt == "csv":
        return frame.to_csv(index=False, lineterminator="\n").rstrip("\n")
    if fmt == "json":
        records = [{str(k): _json_value(v) for k, v in zip(frame.columns, values)}
                   for values in frame.itertuples(index=False, name=None)]
        return json.dumps(records, indent=2, allow_nan=False)
    grid = _text_grid(frame, percent, headers)
    text = _render_table(*grid) if fmt == "table" else _render_markdown(*grid)
    note = pivot_note(df, pivot, agg) if pivot is not None else None
    # A blank line ends a markdown table; without it the note would render as one more table row.
    return text if note is None else text + ("\n" if fmt == "table" else "\n\n") + note


# ----------------------------------------------------------------------------------------------
# status


def _skip_reason(row: Mapping[str, Any]) -> str | None:
    if not _is_null(row.get("error")):
        return str(row["error"])
    diagnostics = row.get("diagnostics")
    if isinstance(diagnostics, str):
        with contextlib.suppress(ValueError):
            parsed = json.loads(diagnostics)
            if isinstance(parsed, dict) and parsed.get("reason"):
                return str(parsed["reason"])
    return None


def status_summary(out_dir: str | os.PathLike, plan_total: int | None = None) -> dict[str, Any]:
    """Counts of finished cells by status and stage, pending cells, and the failed/skipped cells.

    A cell's state is its latest row in the results table, or its marker (DIR/cells/<id>.json)
    when that is newer or the table has no row for it. `finished` counts done + failed + skipped
    (failed cells are rerun on resume); pending = plan_total - finished (None without a plan).
    `rows_missing` counts markers with no row in the table (rebuild_rows_from_markers fixes it)."""
    layout = SweepLayout(out_dir)
    df = load_results(out_dir, latest_only=True, analyses="rows")
    latest: dict[str, dict[str, Any]] = {r["cell_id"]: r for r in df.to_dict(orient="records")}
    rows_missing = 0
    current = layout.current_cells()
    for marker in layout.markers():
        row = marker.get("row") if isinstance(marker, dict) else None
        if not isinstance(row, dict) or not isinstance(row.get("cell_id"), str):
            continue
        if not is_current(row["cell_id"], row.get("code"), current):
            continue  # a cell no grid run holds current (bdsweep prune moves it aside)
        current = latest.get(row["cell_id"])
        if current is None:
            rows_missing += 1
        try:
            marker_time = pd.Timestamp(row.get("finished_at"))
            marker_time = marker_time.tz_localize("UTC") if marker_time.tzinfo is None else marker_time
        except (ValueError, TypeError):
            marker_time = pd.NaT
        if current is None or (not _is_null(marker_time) and not _is_null(current.get("finished_at"))
                               and marker_time > current["finished_at"]):
            latest[row["cell_id"]] = row

    by_status: Counter[str] = Counter({s: 0 for s in STATUSES})
    # attack and defense always listed; analysis only in sweeps that have analysis cells
    by_stage: dict[str, Counter[str]] = {stage: Counter({s: 0 for s in STATUSES}) for stage in STAGES[:2]}
    failed: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    ident = ("cell_id", "stage", "dataset", "model", "attack", "ratio", "label_mode", "target", "seed", "defense",
             "analysis")
    for cell_id in sorted(latest):
        row = latest[cell_id]
        status, stage = str(row.get("status")), str(row.get("stage"))
        by_status[status] += 1
        by_stage.setdefault(stage, Counter({s: 0 for s in STATUSES}))[status] += 1
        entry = {k: _json_value(row.get(k)) for k in ident}
        if status == "failed":
            entry["error"] = _json_value(row.get("error"))
            entry["attempts"] = _json_value(row.get("attempts"))
            marker = layout.marker(cell_id)  # holds the traceback: bdsweep status DIR --traceback CELL_ID
            entry["marker"] = str(marker) if marker.is_file() else None
            failed.append(entry)
        elif status == "skipped":
            entry["reason"] = _skip_reason(row)
            skipped.append(entry)
    finished = sum(by_status.values())
    return {
        "out_dir": str(out_dir),
        "plan_total": plan_total,
        "finished": finished,
        "pending": None if plan_total is None else max(0, int(plan_total) - finished),
        "by_status": dict(by_status),
        "by_stage": {stage: dict(counts) for stage, counts in by_stage.items()},
        "failed": failed,
        "skipped": skipped,
        "rows_missing": rows_missing,
    }


def _describe_cell(entry: Mapping[str, Any]) -> str:
    ratio = entry.get("ratio")
    ratio_text = f"{ratio:g}" if isinstance(ratio, (int, float)) else str(ratio)
    text = (f"{entry.get('cell_id')}  {entry.get('dataset')}/{entry.get('model')}/{entry.get('attack')} "
            f"r={ratio_text} {entry.get('label_mode')} seed={entry.get('seed')}")
    if entry.get("stage") in ("defense", "analysis") or entry.get("defense") not in (None, "none"):
        text += f" defense={entry.get('defense')}"
    if entry.get("stage") == "analysis":
        text += f" analysis={entry.get('analysis')}"
    return text


def failure_lines(entries: Sequence[Mapping[str, Any]], limit: int | None = None, markers: bool = False) -> list[str]:
    """One line per failed cell of status_summary()["failed"]: its id, what it is, its whole first
    error line (and the attempts when it was retried); with `markers`, the marker holding its
    traceback under it. Past `limit` cells, one "... and N more" line."""
    lines = []
    for entry in entries[:limit]:
        attempts = entry.get("attempts")
        suffix = f" [attempts {attempts}]" if attempts not in (None, 1) else ""
        lines.append(f"  {_describe_cell(entry)}: {entry.get('error') or '(no error line)'}{suffix}")
        if markers and entry.get("marker"):
            lines.append(f"      marker: {entry['marker']}")
    if limit is not None and len(entries) > limit:
        lines.append(f"  ... and {len(entries) - limit} more")
    return lines


def format_status(summary: Mapping[str, Any]) -> str:
    """A few human-readable lines for a status_summary() dict."""
    counts = summary["by_status"]
    plan_total = summary.get("plan_total")
    if plan_total is None:
        head = f"cells finished: {summary['finished']}"
    else:
        head = f"cells finished: {summary['finished']} of {plan_total} planned, {summary['pending']} pending"
    lines = [head, "  " + "  ".join(f"{status} {n}" for status, n in counts.items())]
    for stage, stage_counts in summary["by_stage"].items():
        lines.append(f"  {stage + ':':9s}" + "  ".join(f"{status} {n}" for status, n in stage_counts.items()))
    if summary["failed"]:
        lines.append(f"failed ({len(summary['failed'])}):")
        lines += failure_lines(summary["failed"], markers=True)
        if summary.get("out_dir"):
            lines.append(f"  a failed cell's traceback: bdsweep status {summary['out_dir']} --traceback CELL_ID")
    if summary["skipped"]:
        lines.append(f"skipped ({len(summary['skipped'])}):")
        for entry in summary["skipped"]:
            lines.append(f"  {_describe_cell(entry)}: {entry.get('reason') or '(no reason given)'}")
    if summary.get("rows_missing"):
        lines.append(f"note: {summary['rows_missing']} cell marker(s) have no row in the results table; "
                     "sweep.results.rebuild_rows_from_markers() writes them")
    return "\n".join(lines)
