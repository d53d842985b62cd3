"""`bdsweep prune DIR`: move the results of cells that are no longer current out of the way.

A cell is current when the latest run of some grid recorded in the folder (DIR/grids/) lists it
with the code its result was computed by. Every other cell with a row or a marker here (edited
params, removed axes, superseded code) is old: prune moves its rows (into one Parquet file), its
marker and its artifact (unless a current cell uses the same one) under DIR/pruned/<time>/, and
lists what moved. Nothing is deleted; MLflow runs stay as the history they are.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sweep.freshness import move_inside
from sweep.layout import SweepLayout
from sweep.results import is_current, load_results, move_rows


@dataclass
class PruneItem:
    cell_id: str
    what: str  # dataset/model/attack/... of the cell
    marker: bool
    rows: bool
    artifact: str | None


@dataclass
class PruneReport:
    dest: Path
    items: list[PruneItem] = field(default_factory=list)
    rows_moved: int = 0


def old_cells(out_dir: str | Path) -> tuple[list[PruneItem], set[str]]:
    """The cells with a row or a marker that no recorded grid run holds current, and the artifact
    paths that current cells use (never moved)."""
    layout = SweepLayout(out_dir)
    current = layout.current_cells()
    if current is None:
        raise ValueError(f"{out_dir}: no grid run is recorded here (DIR/grids/), so nothing tells old cells "
                         "from current ones; `bdsweep run GRID --out DIR` records one")
    rows = load_results(out_dir, analyses="rows", scope="all")
    markers = {m["row"]["cell_id"]: m["row"] for m in layout.markers()}
    in_use = {str(r["artifact"]) for r in rows[rows["current"]].to_dict(orient="records") if r["artifact"]}
    old_rows = {r["cell_id"]: r for r in rows[~rows["current"]].to_dict(orient="records")}
    for cell_id, row in markers.items():
        if cell_id in old_rows:
            continue
        if is_current(cell_id, row.get("code"), current):
            if row.get("artifact"):
                in_use.add(str(row["artifact"]))
        else:
            old_rows[cell_id] = row
    items = []
    with_rows = set(rows["cell_id"])
    for cell_id in sorted(old_rows):
        row = old_rows[cell_id]
        artifact = row.get("artifact") if isinstance(row.get("artifact"), str) else None
        items.append(PruneItem(cell_id, _describe(row), cell_id in markers, cell_id in with_rows,
                               artifact if artifact and artifact not in in_use and Path(artifact).exists() else None))
    return items, in_use


def _describe(row: dict) -> str:
    parts = [str(row.get(k)) for k in ("dataset", "model", "attack")]
    text = "/".join(parts) + f" r={row.get('ratio')} seed={row.get('seed')} {row.get('stage')}"
    if row.get("stage") != "attack":
        text += f" defense={row.get('defense')}"
    return text


def prune(out_dir: str | Path, dry_run: bool = False) -> PruneReport:
    """Move the old cells' rows, markers and artifacts under DIR/pruned/<time>/ (nothing with dry_run)."""
    layout = SweepLayout(out_dir)
    items, _ = old_cells(out_dir)
    dest = layout.root / "pruned" / time.strftime("%Y%m%d-%H%M%S")
    report = PruneReport(dest, items)
    if dry_run or not items:
        return report
    report.rows_moved = move_rows(out_dir, {i.cell_id for i in items if i.rows}, dest / "results.parquet")
    for item in items:
        if item.marker:
            move_inside(layout.root, layout.marker(item.cell_id), dest)
        if item.artifact:
            move_inside(layout.root, Path(item.artifact), dest)
    return report


def format_prune(report: PruneReport, dry_run: bool) -> str:
    verb = "would move" if dry_run else "moved"
    if not report.items:
        return "nothing to prune: every cell here is current"
    lines = [f"{verb} {len(report.items)} old cell(s)" + ("" if dry_run else f" to {report.dest}") + ":"]
    for item in report.items:
        parts = [p for p, present in (("row", item.rows), ("marker", item.marker)) if present]
        if item.artifact:
            parts.append(f"artifact {item.artifact}")
        lines.append(f"  {item.cell_id}  {item.what}: {', '.join(parts)}")
    if dry_run:
        lines.append("(dry run: nothing was moved)")
    return "\n".join(lines)
