"""sweep.query / `bdsweep query`: DuckDB SQL over a sweep's results, agreeing with load_results."""
from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from sweep import query_results
from sweep.cli import main
from sweep.query import QueryError
from sweep.results import load_results, write_row
from tests.test_results import make_row


@pytest.fixture
def sweep_dir(tmp_path):
    """Two attack cells with two defenses each; one defense retried (the later row wins), one failed,
    and a finished BEC analysis of one defense cell."""
    write_row(tmp_path, make_row("a1", asr=0.95))
    write_row(tmp_path, make_row("a2", attack="blended", asr=0.99))
    defense = dict(stage="defense", defense="ft")
    write_row(tmp_path, make_row("d1", attack_cell_id="a1", asr=0.50, minutes=1, **defense))
    write_row(tmp_path, make_row("d1", attack_cell_id="a1", asr=0.10, minutes=2, attempts=2, **defense))
    write_row(tmp_path, make_row("d2", attack_cell_id="a1", asr=0.30, minutes=1, stage="defense", defense="fp"))
    write_row(tmp_path, make_row("d3", attack_cell_id="a2", attack="blended", asr=0.90, minutes=1, **defense))
    write_row(tmp_path, make_row("d4", attack_cell_id="a2", attack="blended", minutes=1, stage="defense", defense="fp", status="failed",
                                 acc=None, asr=None, ra=None, error="RuntimeError: boom"))
    write_row(tmp_path, make_row("x1", attack_cell_id="a1", minutes=3, stage="analysis", defense="ft",
                                 analysis="bec", parent_cell_id="d1", bec=0.4, acc=None, asr=None, ra=None))
    return tmp_path


def test_sql_sees_the_latest_row_per_cell_with_analyses_merged(sweep_dir):
    got = query_results(sweep_dir, "SELECT cell_id, asr, bec, attempts FROM results WHERE stage = 'defense' "
                                   "AND status = 'done' ORDER BY cell_id")
    expected = load_results(sweep_dir)
    expected = expected[(expected.stage == "defense") & (expected.status == "done")].sort_values("cell_id")
    assert list(got.cell_id) == ["d1", "d2", "d3"] == list(expected.cell_id)
    assert list(got.asr) == pytest.approx(list(expected.asr)) and list(got.asr) == pytest.approx([0.10, 0.30, 0.90])
    assert got.loc[0, "bec"] == pytest.approx(0.4) and got.bec[1:].isna().all()  # merged from the analysis row
    assert got.loc[0, "attempts"] == 2


def test_aggregates_and_the_other_tables(sweep_dir):
    means = query_results(sweep_dir, "SELECT defense, avg(asr) AS asr, count(*) AS n FROM results "
                                     "WHERE stage = 'defense' GROUP BY ALL ORDER BY defense")
    assert means.to_dict("records") == [{"defense": "fp", "asr": pytest.approx(0.30), "n": 2},
                                        {"defense": "ft", "asr": pytest.approx(0.50), "n": 2}]
    counts = query_results(sweep_dir, "SELECT (SELECT count(*) FROM results) r, (SELECT count(*) FROM cells) c, "
                                      "(SELECT count(*) FROM attempts) a")
    assert counts.iloc[0].tolist() == [6, 7, 8]


def test_bad_sql_and_bad_folders_are_clear_errors(sweep_dir, tmp_path):
    with pytest.raises(QueryError, match=r"(?s)nope.*tables: results, cells, attempts"):
        query_results(sweep_dir, "SELECT nope FROM results")
    with pytest.raises(QueryError, match="tables: results"):
        query_results(sweep_dir, "SELECT * FROM leaderboard")
    with pytest.raises(QueryError, match="empty SQL"):
        query_results(sweep_dir, "  ")
    # The SQL reads the results and nothing else from the disk.
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    with pytest.raises(QueryError, match="disabled"):
        query_results(sweep_dir, f"SELECT * FROM read_csv('{secret}')")
    with pytest.raises(QueryError, match="disabled"):
        query_results(sweep_dir, f"COPY (SELECT * FROM results) TO '{tmp_path / 'out.csv'}'")
    assert not (tmp_path / "out.csv").exists()
    with pytest.raises(FileNotFoundError, match="no such output folder"):
        query_results(tmp_path / "missing", "SELECT 1")


def test_the_cli_prints_every_format_and_exits_2_on_errors(sweep_dir, capsys):
    sql = "SELECT attack, defense, asr FROM results WHERE stage = 'defense' AND asr IS NOT NULL ORDER BY ALL"
    assert main(["query", str(sweep_dir), sql, "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records == [{"attack": "badnet", "defense": "fp", "asr": pytest.approx(0.3)},
                       {"attack": "badnet", "defense": "ft", "asr": pytest.approx(0.1)},
                       {"attack": "blended", "defense": "ft", "asr": pytest.approx(0.9)}]
    assert main(["query", str(sweep_dir), sql, "--format", "csv"]) == 0
    assert pd.read_csv(io.StringIO(capsys.readouterr().out)).shape == (3, 3)
    assert main(["query", str(sweep_dir), sql]) == 0
    table = capsys.readouterr().out
    assert "blended" in table and "90.00" in table  # metrics as percentages, as in `bdsweep results`
    assert main(["query", str(sweep_dir), sql, "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("| attack")
    assert main(["query", str(sweep_dir), "SELECT nope FROM results"]) == 2
    assert "Referenced column" in capsys.readouterr().err
