"""SQL over a sweep's results table: DuckDB on the rows that `load_results` reads, so the answers
agree with `bdsweep results` and pandas.

Tables a query may name (each is loaded only when the SQL mentions it):
  results   latest row per cell, the analysis columns merged onto their defense rows (load_results)
  cells     latest row per cell, analysis cells as rows of their own (stage = 'analysis')
  attempts  every row ever written, retries and reruns included

The connection has no file-system access (`enable_external_access = false`): a query reads these
tables and nothing else, and writes nothing.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from sweep.results import load_results

TABLES: dict[str, Callable[[Path, str], pd.DataFrame]] = {
    "results": lambda out, scope: load_results(out, scope=scope),
    "cells": lambda out, scope: load_results(out, analyses="rows", scope=scope),
    "attempts": lambda out, scope: load_results(out, latest_only=False, analyses="rows", scope=scope),
}


class QueryError(ValueError):
    """The SQL could not run (syntax, unknown table or column, a forbidden operation)."""


def _mentioned(sql: str) -> list[str]:
    return [name for name in TABLES if re.search(rf"\b{name}\b", sql, flags=re.IGNORECASE)]


def query_results(out_dir: str | os.PathLike, sql: str, scope: str = "current") -> pd.DataFrame:
    """The rows `sql` (DuckDB's dialect) selects from the tables `results`, `cells` and `attempts` of
    the sweep in `out_dir`. FileNotFoundError when there is no such folder; QueryError when the SQL
    fails, with DuckDB's message and the tables on offer. scope: as in load_results ("current": the
    cells of the latest run of each grid; "all": every row, with a `current` column)."""
    import duckdb

    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such output folder")
    if not sql.strip():
        raise QueryError(f"empty SQL; e.g. SELECT attack, defense, avg(asr) FROM results GROUP BY ALL "
                         f"(tables: {', '.join(TABLES)})")
    con = duckdb.connect(config={"enable_external_access": False})
    try:
        for name in _mentioned(sql):
            con.register(name, TABLES[name](out, scope))
        try:
            cursor = con.execute(sql)
            if cursor.description is None:
                raise QueryError("the SQL returned no table; give a SELECT (or WITH ... SELECT) statement")
            return cursor.df()
        except duckdb.Error as exc:
            raise QueryError(f"{str(exc).strip()}\n(tables: {', '.join(TABLES)}; "
                             f"columns as in `bdsweep results DIR --format csv`)") from exc
    finally:
        con.close()


__all__ = ["QueryError", "TABLES", "query_results"]
