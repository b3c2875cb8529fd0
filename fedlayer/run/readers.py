"""Readers of a run directory's files, one per kind; plots, tables and reports read through these only.

``metrics.jsonl`` (one row per round), ``barriers.csv`` / ``landscape.csv`` (one row per pair, block and α)
and ``summary.json`` / ``partition.json``. A missing file reads as an empty table (or an empty dict): a run
without analysis, or one still in progress, is not an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from fedlayer.run.files import BARRIERS, LANDSCAPE, METRICS

MIDPOINT = 0.5
# Text columns of the analysis CSVs: "" stays "" (not NaN), client ids stay strings ("global" among ints).
_TEXT = ("client_a", "client_b", "kind", "order", "base", "block", "hessian_at")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (blank lines skipped); [] when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """``metrics.jsonl``: one row per round, one column per metric (NaN where a round lacks it)."""
    return pd.DataFrame(read_jsonl(Path(run_dir) / METRICS))


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame()
    header = pd.read_csv(path, nrows=0).columns
    text = {column: str for column in header if column in _TEXT}
    missing = {column: ["nan", ""] for column in header if column not in _TEXT}
    return pd.read_csv(path, dtype=text, keep_default_na=False, na_values=missing)


def read_barriers(run_dir: Path) -> pd.DataFrame:
    """``barriers.csv``: one row per round, pair, path (kind, order, base, block, k) and α."""
    return _read_csv(Path(run_dir) / BARRIERS)


def read_landscape(run_dir: Path) -> pd.DataFrame:
    """``landscape.csv``: one row per round, pair and block (``"*"``: all blocks)."""
    return _read_csv(Path(run_dir) / LANDSCAPE)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file (``summary.json``, ``partition.json``, ``sweep.json``); {} if it does not exist."""
    return json.loads(path.read_text()) if path.exists() else {}


def midpoint(barriers: pd.DataFrame, kind: str | None = None) -> pd.DataFrame:
    """The α = ½ rows of one path kind (layer, full, cumulative, random), or of every kind."""
    if barriers.empty:
        return barriers
    rows = barriers[(barriers["alpha"] - MIDPOINT).abs() < 1e-9]
    return rows if kind is None else rows[rows["kind"] == kind]
