"""sweep.report / `bdsweep report`: the HTML report and its Markdown twin, built from a results table with
two seeds, two ratios, failures, skips, analysis columns and cells on BackdoorBench's published settings."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sweep.cli import main
from sweep.report import build_report, format_value
from sweep.results import load_results, write_row
from tests.test_results import make_row

VOID = {"meta", "img", "br", "hr", "link", "input"}


class Page(HTMLParser):
    """Checks that every tag closes in order; collects images, ids, links and the tables' rows."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.tables: list[dict] = []  # {"title": h3 before it, "headers": [...], "rows": [(class, [cells])]}
        self.cell: list[str] | None = None
        self.row: list[str] | None = None
        self.row_class = ""
        self.heading: list[str] | None = None
        self.title = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a" and attrs.get("href", "").startswith("#"):
            self.links.append(attrs["href"][1:])
        if tag == "h3":
            self.heading = []
        if tag == "table":
            self.tables.append({"title": self.title, "headers": [], "rows": []})
        if tag == "tr":
            self.row, self.row_class = [], attrs.get("class", "")
        if tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "h3":
            self.title, self.heading = "".join(self.heading), None
        if tag in ("td", "th"):
            self.row.append("".join(self.cell).strip())
            self.cell = None
        if tag == "tr":
            table = self.tables[-1]
            if not table["headers"]:
                table["headers"] = self.row
            else:
                table["rows"].append((self.row_class, self.row))

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
        if self.heading is not None:
            self.heading.append(data)


@pytest.fixture
def finished_sweep(tmp_path):
    """digits/smallcnn badnet at 10% and 5% over seeds 0 and 1 with ft and fp, a failed nad cell, a skipped
    cell, a BEC analysis; and a cifar10/preactresnet18 badnet cell with ft (BackdoorBench's setting)."""
    out = tmp_path / "sweep"
    n = 0
    for ratio in (0.1, 0.05):
        for seed in (0, 1):
            attack = f"a-{ratio}-{seed}"
            write_row(out, make_row(attack, ratio=ratio, seed=seed, acc=0.96 - seed / 100, asr=0.95 + seed / 50 - (0.1 - ratio)))
            for defense, asr in (("ft", 0.10 + seed / 10), ("fp", 0.40 + seed / 20)):
                n += 1
                write_row(out, make_row(f"d{n}", attack_cell_id=attack, stage="defense", defense=defense, ratio=ratio,
                                        seed=seed, acc=0.95, asr=asr * ratio * 10, ra=0.8, der=0.9 - asr / 2,
                                        minutes=1))
    write_row(out, make_row("dfail", attack_cell_id="a-0.1-0", stage="defense", defense="nad", status="failed",
                            acc=None, asr=None, ra=None, error="RuntimeError: CUDA out of memory", minutes=2))
    write_row(out, make_row("dskip", attack_cell_id="a-0.1-0", stage="defense", defense="npd", status="skipped",
                            acc=None, asr=None, ra=None, diagnostics=json.dumps({"reason": "not applicable here"}),
                            minutes=2))
    write_row(out, make_row("x1", attack_cell_id="a-0.1-0", stage="analysis", defense="ft", analysis="bec",
                            parent_cell_id="d1", bec=0.37, acc=None, asr=None, ra=None, minutes=3))
    write_row(out, make_row("c-none", dataset="cifar10", model="preactresnet18", acc=0.9, asr=0.96, ra=0.04))
    write_row(out, make_row("c-ft", attack_cell_id="c-none", dataset="cifar10", model="preactresnet18",
                            stage="defense", defense="ft", acc=0.9, asr=0.02, ra=0.88, der=0.96, minutes=1))
    return out


def read_page(report) -> Page:
    page = Page()
    page.feed(report.html.read_text(encoding="utf-8"))
    page.close()
    assert page.stack == [], page.stack
    return page


def test_the_report_is_valid_html_with_its_pngs_and_the_tables_values(finished_sweep, tmp_path):
    report = build_report(finished_sweep, tmp_path / "report")
    page = read_page(report)
    assert report.html.read_text().startswith("<!DOCTYPE html>")
    # every picture it shows: a non-empty PNG beside the page (heatmaps per group, ASR-vs-ratio curves)
    assert len(page.images) >= 5 and len(report.images) == len(page.images)
    for src in page.images:
        data = (report.html.parent / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, src
    assert not any(src.startswith(("http:", "https:", "/")) for src in page.images)
    assert "<script" not in report.html.read_text() and "http" not in report.html.read_text().split("<body>")[1]
    # every link to a cell lands on its configuration
    assert page.links and set(page.links) <= page.ids

    # the leaderboard equals load_results, aggregated over seeds (mean ± std)
    df = load_results(finished_sweep)
    board = next(t for t in page.tables if t["title"] == "Leaderboard: digits / smallcnn / ratio 0.05")
    assert board["headers"][:6] == ["attack", "defense", "ACC", "ASR", "RA", "DER"]
    assert "bec" in board["headers"]  # the analysis column, merged from the analysis cell (ratio 0.1, ft)
    ratio10 = next(t for t in page.tables if t["title"] == "Leaderboard: digits / smallcnn / ratio 0.1")
    ft10 = next(cells for _, cells in ratio10["rows"] if cells[1] == "ft")
    assert ft10[ratio10["headers"].index("bec")] == "0.370"  # one of the two seeds has it
    by_key = {(cells[0], cells[1]): (cls, cells) for cls, cells in board["rows"]}
    assert set(by_key) == {("badnet", "none"), ("badnet", "fp"), ("badnet", "ft")}
    group = df[(df.dataset == "digits") & (df.ratio == 0.05) & (df.status == "done")]
    for (attack, defense), (cls, cells) in by_key.items():
        part = group[group.defense == defense]
        for metric, column in (("acc", 2), ("asr", 3), ("ra", 4), ("der", 5)):
            values = part[metric].dropna()
            expected = format_value(metric, values.mean(), values.std(ddof=1), 2) if len(values) else "-"
            assert cells[column] == expected, (defense, metric, cells[column], expected)
        assert " ± " in cells[3]  # two seeds
    # ft has the higher DER at every ratio: its row is the one marked best
    assert [cells[1] for cls, cells in board["rows"] if cls == "best"] == ["ft"]

    text = report.html.read_text()
    assert "CUDA out of memory" in text and "not applicable here" in text  # failures and skips, with reasons
    ranking = next(t for t in page.tables if t["title"] == "Defenses ranked by mean DER: digits / smallcnn")
    assert [cells[1:4] for _, cells in ranking["rows"]] == [["ft", "82.50", "3.54"], ["fp", "68.75", "1.77"]]
    comparison = next(t for t in page.tables if "ASR published" in t["headers"])
    rows = {(r[1][0], r[1][1]): r[1] for r in comparison["rows"]}
    ft = rows[("badnet", "ft")]
    assert ft[comparison["headers"].index("ASR published")] == "1.48"
    assert ft[comparison["headers"].index("ASR ours")] == "2.00"
    assert ft[comparison["headers"].index("ASR diff")] == "+0.52"

    md = report.markdown.read_text()
    assert "| attack | defense | ACC | ASR | RA | DER |" in md and "CUDA out of memory" in md
    assert all(f"]({src})" in md for src in page.images)


def test_a_new_report_replaces_the_old_one_and_bad_folders_are_errors(finished_sweep, tmp_path, capsys):
    old = build_report(finished_sweep)
    assert old.html == finished_sweep / "report" / "report.html"
    (finished_sweep / "report" / "stale.txt").write_text("x")
    assert main(["report", str(finished_sweep)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert not (finished_sweep / "report" / "stale.txt").exists() and old.html.is_file()
    assert not [p for p in finished_sweep.iterdir() if p.name.startswith(".report")]  # no staging left behind
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such output folder" in capsys.readouterr().err


def test_an_empty_sweep_still_reports(tmp_path):
    (tmp_path / "empty").mkdir()
    report = build_report(tmp_path / "empty")
    page = read_page(report)
    assert page.images == [] and "No finished attack or defense cell yet." in report.html.read_text()
    assert Path(report.markdown).is_file()
