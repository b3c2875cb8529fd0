"""CLI plumbing; the table of bad inputs (exit code 2, one line naming the key) is in test_config.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlayer.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "experiments" / "default.toml")


def test_set_without_equals_sign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", DEFAULT, "--set", "train.lr", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedlayer: error: --set 'train.lr': expected dotted.key=value"
