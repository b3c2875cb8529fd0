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


def test_evaluating_every_third_round_changes_nothing_but_the_evaluations(
    tiny_fmnist: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    """`federation.evaluate_every = 3` of 4 rounds: rounds 3 and 4 (the last) are evaluated and equal the
    every-round run's; rounds 1 and 2 carry no evaluation and no evaluate messages, and train the same."""
    sparse = tmp_path / "sparse"
    run(cli_args(tiny_fmnist, sparse, "federation.evaluate_every=3"))
    every, rows = metrics(uninterrupted), metrics(sparse)
    assert rows[2:] == every[2:]
    for row, full in zip(rows[:2], every[:2], strict=True):
        evaluation = {k for k in full if k.startswith(("global_", "personalized_"))}
        assert evaluation and not evaluation & set(row)
        assert row["bytes_down"] < full["bytes_down"]  # no evaluate instructions went out
        unchanged = set(full) - evaluation - {"bytes_down"}
        assert set(row) == unchanged | {"bytes_down"}
        assert all(row[k] == full[k] for k in unchanged)
    assert_same_model(uninterrupted / "model.pt", sparse / "model.pt")
    assert (sparse / "accuracy.png").exists()
