"""sweep.results: the Parquet results table (atomic row files, crash-safe compaction, loading, formatting)."""
from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from sweep import results as R
from sweep.layout import ROW_COLUMNS, SweepLayout

T0 = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
REPO = Path(__file__).resolve().parents[1]


def make_row(cell_id: str = "c0", *, minutes: float = 0, **overrides) -> dict:
    row = {
        "cell_id": cell_id, "attack_cell_id": cell_id, "sweep": "unit", "stage": "attack",
        "dataset": "digits", "model": "smallcnn", "attack": "badnet", "ratio": 0.1, "label_mode": "all2one",
        "target": 0, "seed": 0, "defense": "none", "acc": 0.95, "asr": 0.9, "ra": 0.08, "der": None,
        "rir": float("nan"), "status": "done", "error": None, "wall_s": 12.5,
        "started_at": (T0 + dt.timedelta(minutes=minutes) - dt.timedelta(seconds=30)).isoformat(),
        "finished_at": T0 + dt.timedelta(minutes=minutes),
        "artifact": f"/tmp/attacks/{cell_id}", "attack_params": {"trigger": "patch"}, "defense_params": "{}",
        "diagnostics": "{}", "attempts": 1,
    }
    row.update(overrides)
    return row


def visible_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------- schema


def test_schema_follows_row_columns():
    assert R.RESULTS_SCHEMA.names == ROW_COLUMNS


def test_row_round_trips_with_exact_schema(tmp_path):
    path = R.write_row(tmp_path, make_row("cellA", started_at="2024-05-01T11:59:30+02:00"))
    assert path.parent == SweepLayout(tmp_path).rows
    assert re.fullmatch(r"cellA-20240501T120000\.000000Z-[0-9a-f]{8}\.parquet", path.name)
    table = pq.read_table(path)
    assert table.schema.equals(R.RESULTS_SCHEMA), table.schema
    (stored,) = table.to_pylist()
    assert stored["finished_at"] == T0
    assert stored["started_at"] == dt.datetime(2024, 5, 1, 9, 59, 30, tzinfo=dt.UTC)  # converted to UTC
    assert stored["der"] is None and stored["rir"] is None  # None and NaN are both stored as null
    assert json.loads(stored["attack_params"]) == {"trigger": "patch"}  # dicts become JSON text
    assert stored["target"] == 0 and stored["attempts"] == 1 and stored["ratio"] == 0.1

    df = R.load_results(tmp_path)
    assert list(df.columns) == ROW_COLUMNS
    assert str(df["finished_at"].dtype) == "datetime64[us, UTC]"
    assert df.loc[0, "finished_at"] == pd.Timestamp(T0)
    assert math.isnan(df.loc[0, "der"]) and df.loc[0, "cell_id"] == "cellA"


def test_write_row_rejects_unknown_and_missing_columns(tmp_path):
    row = make_row()
    del row["asr"]
    row["bogus"] = 1
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['bogus'\].*missing column\(s\) \['asr'\]"):
        R.write_row(tmp_path, row)
    with pytest.raises(ValueError, match="status"):
        R.write_row(tmp_path, make_row(status="finished"))
    with pytest.raises(ValueError, match="seed"):
        R.write_row(tmp_path, make_row(seed="zero"))
    with pytest.raises(ValueError, match="cell_id: must not be null"):
        R.write_row(tmp_path, make_row(cell_id=None))
    with pytest.raises(ValueError, match="finished_at"):
        R.write_row(tmp_path, make_row(finished_at="yesterday-ish"))
    assert visible_files(SweepLayout(tmp_path).rows) == []


# ---------------------------------------------------------------------------------------------- atomicity


def test_write_leaves_no_temp_files(tmp_path):
    for i in range(5):
        R.write_row(tmp_path, make_row(f"c{i}"))
    names = visible_files(SweepLayout(tmp_path).rows)
    assert len(names) == 5 and all(n.endswith(".parquet") and not n.startswith(".") for n in names)


def test_crash_before_rename_leaves_no_visible_file(tmp_path, monkeypatch):
    R.write_row(tmp_path, make_row("kept"))

    def crash(*args, **kwargs):
        raise OSError("simulated crash in os.replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        R.write_row(tmp_path, make_row("lost"))
    monkeypatch.undo()
    names = visible_files(SweepLayout(tmp_path).rows)
    assert len(names) == 1 and names[0].startswith("kept-")  # no partial .parquet, no temp file left
    # A writer killed mid-write leaves only a dot-prefixed temp file: readers never look at it.
    (SweepLayout(tmp_path).rows / ".lost-x.parquet.tmp").write_bytes(b"PAR1 half a file")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = R.load_results(tmp_path)
    assert list(df["cell_id"]) == ["kept"]


def _plant_truncated(tmp_path: Path, name: str) -> Path:
    good = R.write_row(tmp_path, make_row("victim"))
    bad = good.with_name(name)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good.unlink()
    return bad


def test_truncated_file_is_skipped_with_warning_and_quarantined_by_compact(tmp_path):
    R.write_row(tmp_path, make_row("fine"))
    bad = _plant_truncated(tmp_path, "truncated-row.parquet")
    with pytest.warns(R.ResultsFileWarning, match="truncated-row.parquet"):
        df = R.load_results(tmp_path)
    assert list(df["cell_id"]) == ["fine"]

    with pytest.warns(R.ResultsFileWarning, match=r"truncated-row\.parquet.*moved to .*corrupt"):
        assert R.compact(tmp_path) == 1
    assert not bad.exists()
    assert (tmp_path / "results" / "corrupt" / "rows-truncated-row.parquet").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unreadable is left in the dataset
        assert list(R.load_results(tmp_path)["cell_id"]) == ["fine"]


# ---------------------------------------------------------------------------------------------- compaction


def test_compaction_keeps_latest_row_and_deletes_inputs(tmp_path):
    layout = SweepLayout(tmp_path)
    R.write_row(tmp_path, make_row("a", minutes=1, asr=0.1))
    R.write_row(tmp_path, make_row("a", minutes=3, asr=0.3))
    R.write_row(tmp_path, make_row("a", minutes=2, asr=0.2))  # written last but finished earlier
    R.write_row(tmp_path, make_row("b", minutes=1, asr=0.5))
    assert len(R.load_results(tmp_path, latest_only=False)) == 4

    assert R.compact(tmp_path) == 2
    assert visible_files(layout.rows) == []
    parts = visible_files(layout.data)
    assert len(parts) == 1 and re.fullmatch(r"part-\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}\.parquet", parts[0])
    df = R.load_results(tmp_path)
    assert dict(zip(df["cell_id"], df["asr"])) == {"a": 0.3, "b": 0.5}

    # A newer row supersedes the compacted one; the next compaction replaces the old part.
    R.write_row(tmp_path, make_row("a", minutes=9, asr=0.9, status="failed", error="RuntimeError: boom"))
    assert R.compact(tmp_path) == 2
    assert visible_files(layout.rows) == [] and len(visible_files(layout.data)) == 1
    assert parts[0] not in visible_files(layout.data)
    df = R.load_results(tmp_path)
    assert dict(zip(df["cell_id"], df["asr"])) == {"a": 0.9, "b": 0.5}
    assert R.compact(tmp_path) == 2  # nothing new: no rewrite
    assert R.compact(tmp_path / "elsewhere") == 0


def test_same_finished_at_goes_to_the_later_file(tmp_path):
    first = R.write_row(tmp_path, make_row("a", asr=0.1))
    second = R.write_row(tmp_path, make_row("a", asr=0.2))
    os.utime(first, ns=(1_000_000_000, 1_000_000_000))
    os.utime(second, ns=(2_000_000_000, 2_000_000_000))
    assert R.load_results(tmp_path)["asr"].tolist() == [0.2]
    R.compact(tmp_path)
    assert R.load_results(tmp_path)["asr"].tolist() == [0.2]


def test_crash_after_writing_part_before_deleting_inputs(tmp_path, monkeypatch):
    layout = SweepLayout(tmp_path)
    R.write_row(tmp_path, make_row("a", minutes=1, asr=0.1))
    R.write_row(tmp_path, make_row("b", minutes=1, asr=0.5))
    R.compact(tmp_path)
    R.write_row(tmp_path, make_row("a", minutes=5, asr=0.7))
    R.write_row(tmp_path, make_row("c", minutes=5, asr=0.6))

    def crash(paths):
        raise RuntimeError("simulated crash before deleting inputs")

    monkeypatch.setattr(R, "_delete_inputs", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        R.compact(tmp_path)
    monkeypatch.undo()
    assert len(visible_files(layout.data)) == 2 and len(visible_files(layout.rows)) == 2  # duplicates on disk
    assert not [n for n in os.listdir(layout.data) if n.startswith(".")]
    df = R.load_results(tmp_path)
    assert dict(zip(df["cell_id"], df["asr"])) == {"a": 0.7, "b": 0.5, "c": 0.6}
    assert len(R.load_results(tmp_path, latest_only=False)) == 7

    assert R.compact(tmp_path) == 3  # the next compaction cleans up
    assert visible_files(layout.rows) == [] and len(visible_files(layout.data)) == 1
    df = R.load_results(tmp_path)
    assert dict(zip(df["cell_id"], df["asr"])) == {"a": 0.7, "b": 0.5, "c": 0.6}


def test_crash_while_writing_part_keeps_inputs(tmp_path, monkeypatch):
    for i in range(3):
        R.write_row(tmp_path, make_row(f"c{i}"))

    def crash(*args, **kwargs):
        raise OSError("simulated crash in os.replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        R.compact(tmp_path)
    monkeypatch.undo()
    layout = SweepLayout(tmp_path)
    assert visible_files(layout.data) == [] and len(visible_files(layout.rows)) == 3
    assert len(R.load_results(tmp_path)) == 3


def test_concurrent_compaction_and_writes_lose_no_rows(tmp_path):
    script = (
        "import sys, time\n"
        "from sweep.results import compact\n"
        "deadline = time.time() + 60\n"
        "for _ in range(15):\n"
        "    compact(sys.argv[1])\n"
        "    if time.time() > deadline: break\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO) for _ in range(2)]
    n = 150
    for i in range(n):
        R.write_row(tmp_path, make_row(f"c{i:03d}", minutes=i))
        if i % 50 == 0:
            R.compact(tmp_path)
    for proc in procs:
        assert proc.wait(timeout=180) == 0
    assert len(R.load_results(tmp_path)) == n
    assert R.compact(tmp_path) == n
    assert len(visible_files(SweepLayout(tmp_path).data)) == 1


# ---------------------------------------------------------------------------------------------- loading


def test_empty_folder_gives_empty_frame_with_columns(tmp_path):
    df = R.load_results(tmp_path / "nothing-here")
    assert df.empty and list(df.columns) == ROW_COLUMNS


def test_sort_order_puts_no_defense_first(tmp_path):
    R.write_row(tmp_path, make_row("d2", stage="defense", defense="ft", seed=0))
    R.write_row(tmp_path, make_row("d1", stage="defense", defense="anp", seed=0))
    R.write_row(tmp_path, make_row("a1", seed=1))
    R.write_row(tmp_path, make_row("a0", seed=0))
    R.write_row(tmp_path, make_row("b0", attack="blended", seed=0, ratio=0.05))
    df = R.load_results(tmp_path)
    assert df["cell_id"].tolist() == ["a0", "d1", "d2", "a1", "b0"]


def test_load_speed_3000_row_files_then_compacted(tmp_path, monkeypatch):
    n = 3000
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # setup only: durability is tested elsewhere
    t = time.perf_counter()
    for i in range(n):
        R.write_row(tmp_path, make_row(f"cell{i:05d}", minutes=i % 500, seed=i % 7, attack=f"atk{i % 5}"))
    t_write = time.perf_counter() - t
    monkeypatch.undo()

    t = time.perf_counter()
    df = R.load_results(tmp_path)
    t_rows = time.perf_counter() - t
    assert len(df) == n

    t = time.perf_counter()
    assert R.compact(tmp_path) == n
    t_compact = time.perf_counter() - t

    t = time.perf_counter()
    df2 = R.load_results(tmp_path)
    t_part = time.perf_counter() - t
    print(f"\n{n} write_row (no fsync): {t_write:.2f}s; load {n} row files: {t_rows:.2f}s; compact: {t_compact:.2f}s; "
          f"load compacted: {t_part:.3f}s")
    assert len(df2) == n
    pd.testing.assert_frame_equal(df, df2)
    assert t_rows < 10.0
    assert t_part < 1.0


# ---------------------------------------------------------------------------------------------- formatting


@pytest.fixture
def grid_df(tmp_path):
    """badnet/blended x none/ft/anp, two seeds: asr = base + seed/100."""
    base = {("badnet", "none"): 0.90, ("badnet", "ft"): 0.20, ("badnet", "anp"): 0.10,
            ("blended", "none"): 0.80, ("blended", "ft"): 0.40, ("blended", "anp"): 0.30}
    for (attack, defense), asr in base.items():
        for seed in (0, 1):
            stage = "attack" if defense == "none" else "defense"
            R.write_row(tmp_path, make_row(f"{attack}-{defense}-{seed}", attack=attack, defense=defense, seed=seed,
                                           stage=stage, asr=asr + seed / 100, der=None if defense == "none" else 0.5))
    return R.load_results(tmp_path), base


def test_format_table_and_markdown(grid_df):
    df, _ = grid_df
    table = R.format_results(df)
    lines = table.splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == [f"{c} %" if c in R.METRIC_COLUMNS else c
                                                     for c in R.DEFAULT_COLUMNS]
    assert set(lines[1]) == {"-", " "} and len(lines) == 2 + len(df)
    assert "90.00" in table and "91.00" in table  # asr as percent
    assert "cell_id" not in table

    md = R.format_results(df, "markdown", columns=["attack", "defense", "asr"])
    lines = md.splitlines()
    assert lines[0] == "| attack | defense | asr % |"
    assert re.fullmatch(r"\|( :?-{3,}:? \|)+", lines[1])
    assert len(lines) == 2 + len(df)
    assert "| badnet | none | 90.00 |" in md


def test_format_csv_and_json_parse_back(grid_df):
    df, _ = grid_df
    back = pd.read_csv(io.StringIO(R.format_results(df, "csv")))
    assert list(back.columns) == ROW_COLUMNS
    assert back["asr"].tolist() == pytest.approx(df["asr"].tolist())  # raw fractions
    assert back["cell_id"].tolist() == df["cell_id"].tolist()

    records = json.loads(R.format_results(df, "json", columns=["cell_id", "asr", "der", "finished_at"]))
    assert len(records) == len(df) and set(records[0]) == {"cell_id", "asr", "der", "finished_at"}
    by_id = {r["cell_id"]: r for r in records}
    assert by_id["badnet-none-0"]["der"] is None and by_id["badnet-ft-1"]["asr"] == pytest.approx(0.21)
    assert pd.Timestamp(by_id["badnet-none-0"]["finished_at"]) == pd.Timestamp(T0)


def test_pivot_gives_mean_matrix(grid_df):
    df, base = grid_df
    csv = R.format_results(df, "csv", pivot=("attack", "defense", "asr"))
    matrix = pd.read_csv(io.StringIO(csv), index_col="attack")
    assert list(matrix.columns) == ["none", "anp", "ft"]  # no defense first
    assert list(matrix.index) == ["badnet", "blended"]
    for (attack, defense), asr in base.items():
        assert matrix.loc[attack, defense] == pytest.approx(asr + 0.005)  # mean over the two seeds

    table = R.format_results(df, pivot=("attack", "defense", "asr"))
    assert table.splitlines()[0].split() == ["attack", "\\", "defense", "(asr", "%)", "none", "anp", "ft"]
    assert "90.50" in table
    md = R.format_results(df, "markdown", pivot=("attack", "defense", "der"))
    assert "| badnet | - | 50.00 | 50.00 |" in md
    records = json.loads(R.format_results(df, "json", pivot=("attack", "defense", "asr")))
    assert records[0]["attack"] == "badnet" and records[0]["none"] == pytest.approx(0.905)
    with pytest.raises(ValueError, match="not numeric"):
        R.format_results(df, pivot=("attack", "defense", "status"))
    with pytest.raises(ValueError, match="unknown column"):
        R.format_results(df, pivot=("attack", "defense", "nope"))


def test_where_filter_and_bad_where(grid_df):
    df, _ = grid_df
    records = json.loads(R.format_results(df, "json", where="attack == 'blended' and defense != 'none'"))
    assert len(records) == 4 and {r["attack"] for r in records} == {"blended"}
    assert R.format_results(df, where="asr > 0.99").splitlines()[-1] == "(no rows)"
    for bad in ("asr >>> 1", "no_such_column > 1", "attack == "):
        with pytest.raises(ValueError, match="bad where expression"):
            R.format_results(df, where=bad)
    with pytest.raises(ValueError, match="unknown format"):
        R.format_results(df, "html")
    with pytest.raises(ValueError, match="unknown column"):
        R.format_results(df, columns=["attack", "nope"])


def test_text_headers_say_percent_and_csv_json_keep_fractions(grid_df):
    df, _ = grid_df
    df = df.assign(asr_reactivated_wb=0.5)
    columns = ["attack", "seed", "acc", "asr", "der", "asr_reactivated_wb"]
    md = R.format_results(df, "markdown", columns=columns)
    assert md.splitlines()[0] == "| attack | seed | acc % | asr % | der % | asr_reactivated_wb % |"
    table = R.format_results(df, columns=columns).splitlines()
    assert re.split(r"\s{2,}", table[0].strip()) == ["attack", "seed", "acc %", "asr %", "der %",
                                                     "asr_reactivated_wb %"]
    assert "95.00" in table[2] and "50.00" in table[2]
    assert "asr %" in R.format_results(df).splitlines()[0]  # the default columns too
    assert "(asr %)" in R.format_results(df, pivot=("attack", "defense", "asr")).splitlines()[0]
    assert "(asr %)" in R.format_results(df, "markdown", pivot=("attack", "defense", "asr")).splitlines()[0]
    assert "(wall_s)" in R.format_results(df, pivot=("attack", "defense", "wall_s")).splitlines()[0]

    csv = R.format_results(df, "csv", columns=columns)
    assert csv.splitlines()[0] == "attack,seed,acc,asr,der,asr_reactivated_wb" and "%" not in csv
    back = pd.read_csv(io.StringIO(csv))
    assert back["acc"].tolist() == pytest.approx([0.95] * len(df)) and back["asr"].max() < 1
    records = json.loads(R.format_results(df, "json", columns=columns))
    assert set(records[0]) == set(columns) and records[0]["asr_reactivated_wb"] == 0.5
    pivot_csv = R.format_results(df, "csv", pivot=("attack", "defense", "asr"))
    assert pivot_csv.splitlines()[0] == "attack,none,anp,ft" and "%" not in pivot_csv


def test_where_comparing_a_metric_with_a_percent_is_refused(grid_df):
    df, _ = grid_df
    refused = {"asr < 50": "use asr < 0.5 for 50%", "50 > asr": "use 0.5 > asr for 50%",
               "acc >= 90.5": "use acc >= 0.905 for 90.5%", "0 < der < 50": "use der < 0.5",
               "seed == 1 & asr > 50": "use asr > 0.5", "attack == 'badnet' and (ra < 10 or seed == 1)": "ra < 0.1",
               "asr in [50, 60]": "use 0.5 for 50%", "bec > 20": "bec > 0.2",
               "asr_reactivated_wb >= 10 | seed == 0": "asr_reactivated_wb >= 0.1", "`rir` > 5": "rir > 0.05"}
    for where, hint in refused.items():
        with pytest.raises(ValueError, match="metrics are fractions in 0..1") as info:
            R.format_results(df, where=where)
        assert hint in str(info.value) and "\n" not in str(info.value), where
    counts = {"ratio >= 0.05": 12, "seed == 1": 6, "target == 7": 0, "attack == 'badnet'": 6, "asr < 0.5": 8,
              "asr > 1": 0, "attack == 'asr < 50'": 0, "wall_s > 10 and seed < 5": 12}
    for where, n in counts.items():
        assert len(json.loads(R.format_results(df, "json", where=where))) == n, where


def _sweep_folder(tmp_path: Path, rows: list[dict]) -> Path:
    out = tmp_path / "out"
    for row in rows:
        R.write_row(out, row)
    R.compact(out)
    (out / "sweep.json").write_text('{"name": "t"}')
    return out


def test_cli_where_with_a_percent_exits_2_with_one_line(tmp_path, capsys):
    from sweep.cli import main

    out = _sweep_folder(tmp_path, [make_row("a"), make_row("b", seed=1, asr=0.3)])
    assert main(["results", str(out), "--where", "asr < 50"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("bdsweep: error: bad where expression 'asr < 50': metrics are fractions in 0..1")
    assert "use asr < 0.5 for 50%" in line
    for where, n in (("ratio >= 0.05", 2), ("asr < 0.5", 1)):
        assert main(["results", str(out), "--where", where, "--format", "json"]) == 0, where
        assert len(json.loads(capsys.readouterr().out)) == n, where


@pytest.fixture
def ratio_seed_rows():
    """badnet/blended x none/ft, 2 ratios x 2 seeds each: asr = base + ratio + seed / 100."""
    rows = []
    for attack, base in (("badnet", 0.5), ("blended", 0.3)):
        for defense in ("none", "ft"):
            for ratio in (0.05, 0.1):
                for seed in (0, 1):
                    rows.append(make_row(f"{attack}-{defense}-{ratio}-{seed}", attack=attack, defense=defense,
                                         ratio=ratio, seed=seed, asr=base + ratio + seed / 100))
    return rows


def test_pivot_over_several_rows_names_the_axes(tmp_path, ratio_seed_rows):
    for row in ratio_seed_rows:
        R.write_row(tmp_path, row)
    df = R.load_results(tmp_path)
    pivot = ("attack", "defense", "asr")
    note = R.pivot_note(df, pivot)
    assert note.startswith("note: each cell is the mean of up to 4 rows over ratio (2 values), seed (2 values);")
    assert "--agg" in note and "repeat" not in note
    assert R.format_results(df, pivot=pivot).splitlines()[-1] == note
    assert R.format_results(df, "markdown", pivot=pivot).splitlines()[-1] == note
    csv = R.format_results(df, "csv", pivot=pivot)
    assert "note" not in csv
    assert pd.read_csv(io.StringIO(csv), index_col="attack").loc["badnet", "none"] == pytest.approx(0.58)

    most = pd.read_csv(io.StringIO(R.format_results(df, "csv", pivot=pivot, agg="max")), index_col="attack")
    assert most.loc["badnet", "ft"] == pytest.approx(0.61) and most.loc["blended", "none"] == pytest.approx(0.41)
    table = R.format_results(df, pivot=pivot, agg="max").splitlines()
    assert "(max asr %)" in table[0] and "61.00" in table[2]
    assert "each cell is the max of up to 4 rows" in table[-1]
    counts = json.loads(R.format_results(df, "json", pivot=pivot, agg="count"))
    assert counts[0] == {"attack": "badnet", "none": 4, "ft": 4}
    with pytest.raises(ValueError, match="unknown pivot aggregation 'sum'"):
        R.format_results(df, pivot=pivot, agg="sum")

    # One row per cell: no note, in any form.
    one = R.format_results(df, pivot=pivot, where="ratio == 0.1 and seed == 0")
    assert R.pivot_note(df, pivot, where="ratio == 0.1 and seed == 0") is None
    assert one.splitlines()[-1].split() == ["blended", "40.00", "40.00"] and "note" not in one
    assert "note" not in R.format_results(df, pivot=("attack", "seed", "asr"), where="ratio == 0.1 and defense == 'ft'")
    # Two rows with the same identity (another sweep in the folder) are named as such.
    R.write_row(tmp_path, make_row("again", sweep="other", asr=0.2))
    again = R.pivot_note(R.load_results(tmp_path), pivot, where="ratio == 0.1 and seed == 0")
    assert again.startswith("note: each cell is the mean of up to 2 rows;") and "2 rows repeat" in again


def test_cli_pivot_agg_and_note_on_stderr(tmp_path, capsys, ratio_seed_rows):
    from sweep.cli import main

    out = _sweep_folder(tmp_path, ratio_seed_rows)
    pivot = ["--pivot", "attack", "defense", "asr"]
    assert main(["results", str(out), *pivot, "--format", "csv", "--agg", "max"]) == 0
    captured = capsys.readouterr()
    assert pd.read_csv(io.StringIO(captured.out), index_col="attack").loc["badnet", "ft"] == pytest.approx(0.61)
    assert captured.err.splitlines() == [
        "note: each cell is the max of up to 4 rows over ratio (2 values), seed (2 values); "
        "--agg picks mean|median|min|max|count, --where narrows"]
    assert main(["results", str(out), *pivot]) == 0
    captured = capsys.readouterr()
    assert "each cell is the mean" in captured.out.splitlines()[-1] and captured.err == ""
    assert main(["results", str(out), *pivot, "--format", "json", "--where", "ratio == 0.1 and seed == 1"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["results", str(out), "--agg", "max"]) == 2
    assert "--agg max aggregates pivot cells" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- status / markers


def test_status_summary_counts(tmp_path):
    R.write_row(tmp_path, make_row("a0"))
    R.write_row(tmp_path, make_row("a1", seed=1, status="failed", error="RuntimeError: out of memory",
                                   acc=None, asr=None, ra=None, attempts=3))
    R.write_row(tmp_path, make_row("d0", stage="defense", defense="ft"))
    R.write_row(tmp_path, make_row("d1", stage="defense", defense="anp", status="skipped",
                                   error="attack cell failed", acc=None, asr=None, ra=None))
    R.write_row(tmp_path, make_row("d2", stage="defense", defense="ft", minutes=-5, status="failed", error="old"))
    R.write_row(tmp_path, make_row("d2", stage="defense", defense="ft", minutes=5))  # rerun succeeded
    # A finished cell whose row has not reached the table yet still counts (via its marker).
    SweepLayout(tmp_path).write_marker("d3", {"row": make_row("d3", stage="defense", defense="nc",
                                                             finished_at=T0.isoformat())})
    summary = R.status_summary(tmp_path, plan_total=10)
    json.dumps(summary)  # plain data
    assert summary["by_status"] == {"done": 4, "failed": 1, "skipped": 1}
    assert summary["by_stage"] == {"attack": {"done": 1, "failed": 1, "skipped": 0},
                                   "defense": {"done": 3, "failed": 0, "skipped": 1}}
    assert summary["finished"] == 6 and summary["pending"] == 4 and summary["rows_missing"] == 1
    assert [(f["cell_id"], f["error"]) for f in summary["failed"]] == [("a1", "RuntimeError: out of memory")]
    assert [(s["cell_id"], s["reason"]) for s in summary["skipped"]] == [("d1", "attack cell failed")]

    text = R.format_status(summary)
    assert "6 of 10 planned, 4 pending" in text
    assert "RuntimeError: out of memory" in text and "attack cell failed" in text
    assert "rebuild_rows_from_markers" in text
    assert R.status_summary(tmp_path)["pending"] is None


def test_rebuild_rows_from_markers(tmp_path):
    layout = SweepLayout(tmp_path)
    for cid in ("m0", "m1", "m2"):
        row = make_row(cid)
        row["finished_at"] = row["finished_at"].isoformat()  # markers hold JSON
        layout.write_marker(cid, {"status": "done", "row": row})
    R.write_row(tmp_path, make_row("m1"))
    assert R.rebuild_rows_from_markers(tmp_path) == 2
    assert R.load_results(tmp_path)["cell_id"].tolist() == ["m0", "m1", "m2"]
    assert R.rebuild_rows_from_markers(tmp_path) == 0

    # After a corrupt file is quarantined, its rows come back from the markers.
    R.compact(tmp_path)
    (part,) = layout.data.iterdir()
    part.write_bytes(part.read_bytes()[:100])
    with pytest.warns(R.ResultsFileWarning, match="corrupt"):
        assert R.compact(tmp_path) == 0
    assert R.rebuild_rows_from_markers(tmp_path) == 3
    assert len(R.load_results(tmp_path)) == 3


def test_importing_sweep_is_light():
    code = ("import sys, sweep; assert not {'ray', 'mlflow', 'pandas', 'pyarrow'} & set(sys.modules), "
            "sorted(sys.modules); from sweep import load_results; assert callable(load_results); "
            "assert not {'ray', 'mlflow'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
