"""Which finished cells are still current: stale code, explicit re-runs, and what depends on them.

A finished cell is stale when the code fingerprint its marker recorded differs from the one the
plan computes now (sweep.codeprint), or when its marker recorded none (written before fingerprints
existed: nothing vouches for its code). `bdsweep run` recomputes stale cells and the cells that
depend on them (an attack cell's defenses, a defense cell's analyses, a transfer analysis's
surrogates) unless told `--keep-stale`; `--rerun EXPR` does the same for the finished cells an
expression selects. A recomputed cell's marker is kept under cells/invalidated/ and its artifact is
moved under superseded/, so bdcore recomputes it instead of reusing it.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from sweep.codeprint import changed_modules
from sweep.layout import ROW_COLUMNS, SweepLayout

NO_FINGERPRINT = "recorded before code fingerprints"


def planned_codes(plan) -> dict[str, str]:
    """cell id -> the code fingerprint the plan computes for it."""
    return {c.cell_id: c.code for c in [*plan.attacks, *plan.defenses, *plan.analyses]}


def stale_cells(planned: dict[str, str], markers: dict[str, dict]) -> dict[str, str | None]:
    """cell id -> the fingerprint its marker recorded, for every finished cell of the plan whose code
    changed since (None: recorded none)."""
    stale = {}
    for cell_id, marker in markers.items():
        recorded = marker["row"].get("code")
        if cell_id in planned and recorded != planned[cell_id]:
            stale[cell_id] = recorded
    return stale


def changed_files(layout: SweepLayout, plan, stale: dict[str, str | None], limit: int = 8) -> list[str]:
    """The source files whose change made `stale` cells stale (or NO_FINGERPRINT), most cells first."""
    planned = planned_codes(plan)
    counts: dict[str, int] = {}
    pairs: dict[tuple, int] = {}
    for cell_id, old in stale.items():
        key = (old, planned[cell_id])
        pairs[key] = pairs.get(key, 0) + 1
    for (old, new), n in pairs.items():
        before = layout.read_code_record(old)
        after = plan.code_records.get(new) or layout.read_code_record(new)
        files = [NO_FINGERPRINT] if old is None else (
            changed_modules(before, after) if before and after else [f"code record {old} missing"])
        for path in files:
            counts[path] = counts.get(path, 0) + n
    ranked = sorted(counts, key=lambda p: (-counts[p], p))
    return [_short(p) for p in ranked[:limit]] + ([f"and {len(ranked) - limit} more"] if len(ranked) > limit else [])


def _short(path: str) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


def select_finished(markers: dict[str, dict], planned: Iterable[str], where: str) -> set[str]:
    """Ids of the plan's finished cells whose rows `where` selects (the --where language)."""
    from sweep.results import select_rows

    ids = set(planned)
    rows = [m["row"] for cid, m in markers.items() if cid in ids]
    if not rows:
        return set()
    frame = pd.DataFrame(rows).reindex(columns=ROW_COLUMNS)
    return set(select_rows(frame, where)["cell_id"])


def with_dependents(payloads: list[dict], ids: set[str]) -> set[str]:
    """`ids` and every cell that requires one of them, transitively (payloads are in dependency order)."""
    closed = set(ids)
    for payload in payloads:
        if payload["cell_id"] not in closed and any(r in closed for r in payload["requires"]):
            closed.add(payload["cell_id"])
    return closed


def dependents_in_plan(plan, ids: set[str]) -> set[str]:
    """The cells of `plan` that depend on `ids` and are not in it: an attack cell's defense cells, a
    defense cell's analysis cells (a transfer analysis: any sibling defense's too)."""
    from bdcore.reactivation import ANALYSES

    defenses = {d.cell_id for d in plan.defenses if d.attack_cell_id in ids or d.cell_id in ids}
    analyses = {a.cell_id for a in plan.analyses if a.defense_cell_id in defenses
                or (ANALYSES.get(a.spec.analysis).needs_surrogates and a.attack_cell_id in
                    {d.attack_cell_id for d in plan.defenses if d.cell_id in defenses})}
    return (defenses | analyses) - ids


def supersede(layout: SweepLayout, marker: dict, reason: str, stamp: str | None = None) -> None:
    """Set a finished cell aside so that it is computed again: its artifact (when inside the output
    folder) moves under superseded/<stamp>/, its marker under cells/invalidated/ with `reason`."""
    row = marker["row"]
    artifact = row.get("artifact")
    if artifact:
        move_inside(layout.root, Path(artifact), layout.root / "superseded" / (stamp or time.strftime("%Y%m%d-%H%M%S")))
    layout.invalidate_marker(row["cell_id"], reason)


def move_inside(root: Path, path: Path, dest_root: Path) -> Path | None:
    """Move `path` (a file or folder under `root`) to the same relative place under `dest_root`;
    None when it is absent or outside `root` (never touched then)."""
    if not path.exists():
        return None
    try:
        relative = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    dest = dest_root / relative
    if dest.exists():
        dest = dest.with_name(f"{dest.name}-{time.time_ns()}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(dest))
    return dest
