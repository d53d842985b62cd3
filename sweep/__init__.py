"""sweep: the distributed layer of the engine (grids of bdcore cells, resumable, with a results table).

Importing `sweep` is cheap: it pulls in neither ray nor mlflow (nor pandas/pyarrow); the names below
are loaded on first use.

  from sweep import load_results
  df = load_results("runs/my-sweep")          # one row per cell, latest result
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "load_results": "sweep.results",
    "format_results": "sweep.results",
    "compact": "sweep.results",
    "write_row": "sweep.results",
    "status_summary": "sweep.results",
    "format_status": "sweep.results",
    "rebuild_rows_from_markers": "sweep.results",
    "query_results": "sweep.query",
    "prune": "sweep.prune",
}

__all__ = [
    "compact", "format_results", "format_status", "load_results", "prune", "query_results",
    "rebuild_rows_from_markers", "status_summary", "write_row",
]

if TYPE_CHECKING:  # pragma: no cover
    from sweep.prune import prune
    from sweep.query import query_results
    from sweep.results import (
        compact,
        format_results,
        format_status,
        load_results,
        rebuild_rows_from_markers,
        status_summary,
        write_row,
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sweep' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
