"""Same config + seed on CPU: identical metrics.jsonl values (timing aside) and identical models."""

from __future__ import annotations

from pathlib import Path

import pytest
from sim_helpers import assert_same_model, cli_args, metrics, run

# Serial: shares the uninterrupted reference run with tests/test_lifecycle.py.
pytestmark = [pytest.mark.slow, pytest.mark.serial]


def test_two_runs_with_the_same_seed_are_identical(
    tiny_fmnist: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    a, b = uninterrupted, tmp_path / "b"
    run(cli_args(tiny_fmnist, b))
    rows = metrics(a)
    assert len(rows) == 4 and all(r["clients_trained"] == 2 for r in rows)
    assert rows == metrics(b)
    assert_same_model(a / "model.pt", b / "model.pt")
