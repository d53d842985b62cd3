"""A report people read, built from a sweep's results table: one self-contained HTML page (and a
Markdown twin) with PNG figures beside it, opened from disk with no server and no network.

Per (dataset, model, ratio): an attack x defense leaderboard (ACC / ASR / RA / DER, plus BEC and the
re-activation ASRs when the sweep ran those analyses), the best defense per attack (highest DER) marked,
and heatmaps of ASR and DER. Per (dataset, model): ASR-vs-poisoning-ratio curves per attack, and the
defenses ranked by mean DER with the spread over seeds. Every value over several seeds is mean +- std.
Failed and skipped cells are listed with their reasons; every cell's exact configuration is in an
appendix that the leaderboard rows link to. Where the sweep covers BackdoorBench's published CIFAR-10 /
PreAct-ResNet18 settings, our numbers stand beside the published ones (sweep/data/).
"""
from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bdcore.atomic import atomic_replace_dir
from sweep.results import ANALYSIS_SUMMARY_COLUMNS, is_percent_column, label_order, load_results, status_summary

LEADERBOARD_METRICS = ("acc", "asr", "ra", "der")
PUBLISHED = Path(__file__).resolve().parent / "data" / "backdoorbench_cifar10.json"
GROUP = ["dataset", "model", "ratio"]
CELL = [*GROUP, "label_mode", "attack", "defense"]


@dataclass
class Table:
    """What both renderers draw: a titled grid of text, rows that are marked best, links to cells."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    best: set[int] = field(default_factory=set)
    links: list[list[str]] = field(default_factory=list)  # cell ids per row
    note: str = ""

    def linked_rows(self, escape: Callable[[str], str], link: Callable[[str], str]) -> Iterator[list[str]]:
        """Each row escaped, its cell ids drawn by `link` in the "cells" column (else the first one)."""
        column = -1 if self.headers[-1] == "cells" else 0
        for i, row in enumerate(self.rows):
            cells = [escape(c) for c in row]
            if i < len(self.links) and self.links[i]:
                cells[column] = " ".join(link(c) for c in self.links[i])
            yield cells


@dataclass
class Section:
    title: str
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (relative path, caption)
    text: str = ""


@dataclass
class Report:
    html: Path
    markdown: Path
    images: list[Path]


# -- numbers ------------------------------------------------------------------------------------

def format_value(metric: str, mean: float, std: float = float("nan"), n: int = 1) -> str:
    """How a (mean, std over n seeds) prints: metrics in % with 2 decimals, BEC with 3."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    scale, digits = (100.0, 2) if is_percent_column(metric) else (1.0, 3)
    text = f"{scale * mean:.{digits}f}"
    if n > 1 and not math.isnan(std):
        text += f" ± {scale * std:.{digits}f}"
    return text


def _metrics_of(df: pd.DataFrame) -> list[str]:
    return [*LEADERBOARD_METRICS, *(c for c in ANALYSIS_SUMMARY_COLUMNS if c in df and df[c].notna().any())]


def aggregate(done: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, ratio, label_mode, attack, defense): each metric's mean and std over
    seeds (`<m>`, `<m>_std`), the number of seeds and the cell ids."""
    metrics = _metrics_of(done)
    records = []
    for key, part in done.groupby(CELL, sort=False, dropna=False):
        record = dict(zip(CELL, key))
        for metric in metrics:
            values = part[metric].dropna().astype(float)
            record[metric] = float(values.mean()) if len(values) else float("nan")
            record[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        record["seeds"] = int(part["seed"].nunique())
        record["cell_ids"] = sorted(part["cell_id"])
        records.append(record)
    columns = [*CELL, *(c for m in metrics for c in (m, f"{m}_std")), "seeds", "cell_ids"]
    return pd.DataFrame.from_records(records, columns=columns)


def _attack_label(row: pd.Series | dict) -> str:
    return row["attack"] if row["label_mode"] == "all2one" else f"{row['attack']} ({row['label_mode']})"


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(str(p) for p in parts)).strip("-")


# -- sections -----------------------------------------------------------------------------------

def _leaderboard(group: pd.DataFrame, metrics: list[str], title: str) -> Table:
    headers = ["attack", "defense", *(m.upper() if m in LEADERBOARD_METRICS else m for m in metrics), "seeds", "cells"]
    table = Table(title, headers, [], note="Best defense per attack (highest DER) in bold.")
    labels = group.apply(_attack_label, axis=1)
    for attack in sorted(set(labels)):
        rows = group[labels == attack]
        rows = rows.set_index("defense").loc[label_order(set(rows["defense"]))].reset_index()
        defended = rows[rows["defense"] != "none"]["der"]
        best = defended.idxmax() if defended.notna().any() else None
        for i, row in rows.iterrows():
            if best is not None and i == best:
                table.best.add(len(table.rows))
            table.rows.append([attack, row["defense"],
                               *(format_value(m, row[m], row[f"{m}_std"], row["seeds"]) for m in metrics),
                               str(row["seeds"]), ""])
            table.links.append(list(row["cell_ids"]))
    return table


def _heatmap(group: pd.DataFrame, metric: str, path: Path, title: str) -> bool:
    import matplotlib.pyplot as plt

    frame = group if metric != "der" else group[group["defense"] != "none"]
    if frame[metric].notna().sum() == 0:
        return False
    labels = frame.apply(_attack_label, axis=1)
    grid = frame.assign(attack_label=labels).pivot_table(index="attack_label", columns="defense", values=metric,
                                                         aggfunc="mean")
    grid = grid.reindex(columns=label_order(grid.columns))
    fig, ax = plt.subplots(figsize=(1.1 + 0.7 * grid.shape[1], 1.0 + 0.45 * grid.shape[0]))
    image = ax.imshow(100 * grid.to_numpy(dtype=float), vmin=0, vmax=100, cmap="RdYlGn_r" if metric == "asr"
                      else "RdYlGn", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=45, ha="right")
    ax.set_yticks(range(grid.shape[0]), grid.index)
    legible = grid.shape[0] * grid.shape[1] <= 300  # past that the numbers would not fit (and slow the drawing)
    for (r, c), value in np.ndenumerate(grid.to_numpy(dtype=float)):
        if legible and not math.isnan(value):
            ax.text(c, r, f"{100 * value:.0f}", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=f"{metric.upper()} (%)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return True


def _ratio_curves(frame: pd.DataFrame, path: Path, title: str) -> bool:
    import matplotlib.pyplot as plt

    if frame["ratio"].nunique() < 2:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for defense in label_order(set(frame["defense"])):
        line = frame[frame["defense"] == defense].sort_values("ratio")
        mean, std = 100 * line["asr"].to_numpy(float), 100 * line["asr_std"].fillna(0).to_numpy(float)
        (drawn,) = ax.plot(line["ratio"], mean, marker="o", markersize=3, label=defense)
        if std.any():  # the spread over seeds, as a band (cheaper to draw than error bars)
            ax.fill_between(line["ratio"], mean - std, mean + std, color=drawn.get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ratios = sorted(frame["ratio"].unique())
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.minorticks_off()
    ax.set_xlabel("poisoning ratio")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=1 + len(set(frame["defense"])) // 12, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.subplots_adjust(left=0.1, right=0.7, bottom=0.14, top=0.9)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return True


def _defense_ranking(done: pd.DataFrame, title: str) -> Table | None:
    defended = done[(done["defense"] != "none") & done["der"].notna()]
    if defended.empty:
        return None
    rows = []
    for defense, part in defended.groupby("defense"):
        per_seed = part.groupby("seed")["der"].mean()
        rows.append((defense, float(part["der"].mean()), float(per_seed.std(ddof=1)) if len(per_seed) > 1
                     else float("nan"), len(per_seed), len(part), float(part["acc"].mean()), float(part["asr"].mean())))
    rows.sort(key=lambda r: -r[1])
    table = Table(title, ["rank", "defense", "mean DER", "std over seeds", "seeds", "cells", "mean ACC", "mean ASR"],
                  [], note="Mean DER over every attack and ratio of this dataset and model; the spread is the "
                           "standard deviation of the per-seed means.")
    for rank, (defense, der, std, seeds, cells, acc, asr) in enumerate(rows, 1):
        table.rows.append([str(rank), defense, format_value("der", der), format_value("der", std),
                           str(seeds), str(cells), format_value("acc", acc), format_value("asr", asr)])
    return table


def _comparison(agg: pd.DataFrame) -> Table | None:
    published = json.loads(PUBLISHED.read_text())
    ours = agg[(agg["dataset"] == published["dataset"]) & (agg["model"] == published["model"])
               & (agg["label_mode"] == "all2one")]
    rows = []
    for entry in published["entries"]:
        match = ours[(ours["attack"] == entry["attack"]) & (ours["defense"] == entry["defense"])
                     & np.isclose(ours["ratio"], entry["ratio"])]
        if match.empty:
            continue
        mine = match.iloc[0]
        cells = [entry["attack"], entry["defense"], f"{entry['ratio']:g}"]
        for metric in ("acc", "asr", "ra"):
            theirs = entry.get(metric)
            value = 100 * mine[metric]
            cells += [format_value(metric, mine[metric], mine[f"{metric}_std"], mine["seeds"]),
                      "-" if theirs is None else f"{theirs:.2f}",
                      "-" if theirs is None or math.isnan(value) else f"{value - theirs:+.2f}"]
        rows.append(cells)
    if not rows:
        return None
    headers = ["attack", "defense", "ratio"] + [f"{m} {w}" for m in ("ACC", "ASR", "RA") for w in ("ours", "published", "diff")]
    return Table(f"Against BackdoorBench ({published['dataset']}, {published['model']})", headers, rows,
                 note=f"Published: {published['source']}. diff = ours - published, in points.")


def _problems(summary: dict) -> list[Table]:
    tables = []
    for status, key, what in (("failed", "failed", "error"), ("skipped", "skipped", "reason")):
        entries = summary[key]
        if not entries:
            continue
        table = Table(f"{status.capitalize()} cells ({len(entries)})",
                      ["cell", "stage", "dataset", "model", "attack", "ratio", "seed", "defense", "analysis", what], [])
        for e in entries:
            table.rows.append([e["cell_id"], *(str(e.get(k) if e.get(k) is not None else "-") for k in
                               ("stage", "dataset", "model", "attack", "ratio", "seed", "defense", "analysis")),
                               str(e.get(what) or "-")])
            table.links.append([e["cell_id"]])
        tables.append(table)
    return tables


def _cell_config(row: dict) -> dict:
    config = {}
    for key, value in row.items():
        if isinstance(value, float) and math.isnan(value) or value is None:
            continue
        if key in ("attack_params", "defense_params", "diagnostics", "analysis_budget") and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        if isinstance(value, pd.Timestamp):
            value = value.isoformat()
        elif isinstance(value, np.generic):
            value = value.item()
        config[key] = value
    return config


# -- rendering ----------------------------------------------------------------------------------

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:90em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}tr.best td{font-weight:bold;background:#e8f5e9}
img{max-width:100%;margin:.5em 1em 1em 0;border:1px solid #ddd}pre{background:#f7f7f7;padding:.6em;overflow:auto}
details{margin:.2em 0}summary{cursor:pointer;font-family:monospace}.note{color:#555;font-size:.85em}"""


def _html_table(table: Table) -> str:
    out = [f"<h3>{html.escape(table.title)}</h3>"]
    if table.note:
        out.append(f'<p class="note">{html.escape(table.note)}</p>')
    out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.headers) + "</tr></thead><tbody>")
    rows = table.linked_rows(html.escape, lambda c: f'<a href="#cell-{html.escape(c)}">{html.escape(c[:8])}</a>')
    for i, cells in enumerate(rows):
        attrs = ' class="best"' if i in table.best else ""
        out.append(f"<tr{attrs}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    out = [f"### {table.title}", ""]
    if table.note:
        out += [f"_{_md_escape(table.note)}_", ""]
    out.append("| " + " | ".join(_md_escape(h) for h in table.headers) + " |")
    out.append("|" + "---|" * len(table.headers))
    for i, cells in enumerate(table.linked_rows(_md_escape, lambda c: f"[{c[:8]}](#cell-{c})")):
        if i in table.best:
            cells = [f"**{c}**" if c else c for c in cells]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _render_html(title: str, intro: str, sections: list[Section], cells: list[dict]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            body.append(f"<p>{html.escape(section.text)}</p>")
        body += [_html_table(t) for t in section.tables]
        body += [f'<figure><img src="{html.escape(src)}" alt="{html.escape(cap)}"><figcaption class="note">'
                 f"{html.escape(cap)}</figcaption></figure>" for src, cap in section.images]
    body.append(f"<h2>Cells ({len(cells)})</h2>")
    for cell in cells:
        label = " ".join(str(cell.get(k)) for k in ("stage", "attack", "defense", "analysis", "ratio", "seed", "status")
                         if cell.get(k) not in (None, ""))
        body.append(f'<details id="cell-{html.escape(cell["cell_id"])}"><summary>{html.escape(cell["cell_id"])} '
                    f"{html.escape(label)}</summary><pre>{html.escape(json.dumps(cell, indent=2, default=str))}"
                    "</pre></details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _render_markdown(title: str, intro: str, sections: list[Section], cells: list[dict]) -> str:
    out = [f"# {title}", "", intro, ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        if section.text:
            out += [section.text, ""]
        out += [_md_table(t) for t in section.tables]
        out += [f"![{cap}]({src})\n" for src, cap in section.images]
    out += [f"## Cells ({len(cells)})", ""]
    for cell in cells:
        out += [f'<a id="cell-{cell["cell_id"]}"></a>', "", "```json", json.dumps(cell, indent=2, default=str), "```", ""]
    return "\n".join(out)


# -- the report ---------------------------------------------------------------------------------

class ReportFolderError(ValueError):
    """A report folder that writing the report would destroy something in."""


REPORT_FILES = ("report.html", "report.md")


def check_report_folder(out: Path, final: Path) -> None:
    """The report replaces `final` as a whole, so `final` must be new, empty, or an older report:
    never the output folder, a folder holding it, or a folder of other files (results/, cells/...)."""
    where, sweep = final.resolve(), out.resolve()
    if where == sweep or where in sweep.parents:
        raise ReportFolderError(f"report folder {str(final)!r} is the output folder {str(out)!r} or holds it: "
                                f"writing the report there would delete the sweep (default: {out / 'report'})")
    if final.is_file():
        raise ReportFolderError(f"report folder {str(final)!r} is a file; give a new folder or an older report folder")
    if final.is_dir() and any(final.iterdir()) and not any((final / name).is_file() for name in REPORT_FILES):
        raise ReportFolderError(f"report folder {str(final)!r} holds other files, which the report would replace; "
                                f"give a new folder, an empty one, or an older report folder (with "
                                f"{' / '.join(REPORT_FILES)})")


def build_report(out_dir: str | os.PathLike, report_dir: str | os.PathLike | None = None,
                 scope: str = "current") -> Report:
    """Write report.html, report.md and images/*.png for the sweep in `out_dir` into `report_dir`
    (default DIR/report), replacing an older report in one rename. scope: as in load_results (the
    current cells of each grid by default; "all" includes old ones)."""
    import matplotlib

    matplotlib.use("Agg")

    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such output folder")
    final = Path(report_dir) if report_dir is not None else out / "report"
    check_report_folder(out, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    try:
        report = _write(out, staging, final, scope)
        atomic_replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _write(out: Path, staging: Path, final: Path, scope: str = "current") -> Report:
    rows = load_results(out, scope=scope)
    summary = status_summary(out)
    done = rows[(rows["status"] == "done") & (rows["stage"] != "analysis")]
    metrics = _metrics_of(done)
    agg = aggregate(done)
    sections: list[Section] = []

    comparison = _comparison(agg) if not agg.empty else None
    for key, group in agg.groupby(GROUP, sort=True, dropna=False):
        dataset, model, ratio = key
        name = f"{dataset} / {model} / ratio {ratio:g}"
        section = Section(name, [_leaderboard(group.reset_index(drop=True), metrics, f"Leaderboard: {name}")])
        for metric in ("asr", "der"):
            rel = f"images/{_slug(dataset, model, ratio, metric)}.png"
            if _heatmap(group, metric, staging / rel, f"{metric.upper()} (%): {name}"):
                section.images.append((rel, f"{metric.upper()} heatmap, {name} (mean over seeds)"))
        sections.append(section)
    for (dataset, model), part in agg.groupby(["dataset", "model"], sort=True):
        section = Section(f"{dataset} / {model}: across ratios and defenses")
        ranking = _defense_ranking(done[(done["dataset"] == dataset) & (done["model"] == model)],
                                   f"Defenses ranked by mean DER: {dataset} / {model}")
        if ranking is not None:
            section.tables.append(ranking)
        for attack_label, curve in part.groupby(part.apply(_attack_label, axis=1), sort=True):
            rel = f"images/{_slug(dataset, model, attack_label, 'asr-vs-ratio')}.png"
            if _ratio_curves(curve, staging / rel, f"ASR vs poisoning ratio: {attack_label}, {dataset} / {model}"):
                section.images.append((rel, f"ASR vs poisoning ratio, {attack_label} ({dataset} / {model})"))
        if section.tables or section.images:
            sections.append(section)
    if comparison is not None:
        sections.append(Section("Comparison with published numbers", [comparison]))
    problems = _problems(summary)
    sections.append(Section("Failed and skipped cells", problems,
                            text="" if problems else "None: every finished cell is done."))

    cells = [_cell_config(r) for r in load_results(out, analyses="rows", scope=scope).to_dict(orient="records")]
    counts = summary["by_status"]
    title = f"Backdoor sweep report: {out.resolve().name}"
    intro = (f"{len(cells)} cells: {counts.get('done', 0)} done, {counts.get('failed', 0)} failed, "
             f"{counts.get('skipped', 0)} skipped. Values over several seeds are mean ± std. Built from "
             f"{out.resolve()} with bdsweep report.")
    if agg.empty:
        sections.insert(0, Section("Leaderboards", text="No finished attack or defense cell yet."))
    (staging / "report.html").write_text(_render_html(title, intro, sections, cells), encoding="utf-8")
    (staging / "report.md").write_text(_render_markdown(title, intro, sections, cells), encoding="utf-8")
    images = [src for s in sections for src, _ in s.images]
    return Report(final / "report.html", final / "report.md", [final / i for i in images])


__all__ = ["Report", "aggregate", "build_report", "format_value"]
