"""Readers of a run directory's files, one per kind; plots, tables and reports read through these only.

``metrics.jsonl`` (one row per round), ``barriers.csv`` / ``landscape.csv`` (one row per pair, block and α)
and ``summary.json`` / ``partition.json``. A missing file reads as an empty table (or an empty dict): a run
without analysis, or one still in progress, is not an error.

A damaged file is one line naming it (:class:`RunFileError`), except a row file's last line cut off without
its newline (what a crash or a full disk leaves while a row is appended): that row is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from fedlayer.config import ConfigError
from fedlayer.run.files import BARRIERS, LANDSCAPE, METRICS

log = logging.getLogger(__name__)

MIDPOINT = 0.5
# Text columns of the analysis CSVs: "" stays "" (not NaN), client ids stay strings ("global" among ints).
_TEXT = ("client_a", "client_b", "kind", "order", "base", "block", "hessian_at")


class RunFileError(ConfigError):
    """A run file that cannot be read: one line naming the file (and the line)."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (blank lines skipped); [] when it does not exist."""
    text = _read_text(path)
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                _warn_once(
                    f"{path}: line {number} is cut off (a crash or a full disk while it was written); skipped"
                )
                continue
            raise RunFileError(
                f"{path}: line {number} is not a JSON row ({err.msg}, column {err.colno})"
            ) from None
        if not isinstance(row, dict):
            raise RunFileError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


_warned: set[str] = set()  # a file read several times by one command is warned about once


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _read_text(path: Path) -> str:
    """The text of a run file ("" when it does not exist)."""
    try:
        return path.read_text() if path.exists() else ""
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise RunFileError(f"{path}: cannot be read ({reason})") from None


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
    if not path.exists():
        return {}
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path}: not a JSON file ({err.msg}, line {err.lineno})") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path}: not a JSON object")
    return value


def midpoint(barriers: pd.DataFrame, kind: str | None = None) -> pd.DataFrame:
    """The α = ½ rows of one path kind (layer, full, cumulative, random), or of every kind."""
    if barriers.empty:
        return barriers
    rows = barriers[(barriers["alpha"] - MIDPOINT).abs() < 1e-9]
    return rows if kind is None else rows[rows["kind"] == kind]
