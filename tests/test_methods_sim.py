"""A method beyond a block split, killed with SIGKILL after round 2 and resumed, ends exactly like the
uninterrupted run: client state, model extensions and checkpoints survive, and runs are deterministic.
``tests/test_algorithms.py`` runs every registry name (bytes on the wire, the analysis hook on the methods).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from sim_helpers import assert_same_model, cli_args, metrics, run
from test_resume import run_until_killed

from strategies import ALGORITHMS

pytestmark = pytest.mark.slow
TINY = ("federation.clients=3", "federation.fraction_train=1.0", "federation.rounds=3")


# `make test-all`, not CI: test_resume is the same resume; the client-state store is unit-tested (test_store)
@pytest.mark.extended
@pytest.mark.parametrize(
    ("name", "settings"),
    [
        # PFLlib's default dbe_kl_weight 0 would leave the regularizer's state untested
        ("feddbe", ["strategy.dbe_kl_weight=1.0"]),
        # killed after a decision round: the policy's evidence and shared set and the clients' state resume
        ("lmc", ["strategy.lmc_criterion='shadow'"]),
    ],
)
def test_method_resumes_after_sigkill_to_the_uninterrupted_result(
    name: str, settings: list[str], tiny_fmnist: Path, tmp_path: Path
) -> None:
    """FedDBE has both a model extension and client state; Ditto's and FedALA's state and FedRoD's
    extension take the same paths. ``lmc`` with the shadow criterion (mixing below the tail): client state
    (weights, shadows, their roles) and a server policy decided every round."""

    def args(out: Path) -> list[str]:
        return cli_args(tiny_fmnist, out, *TINY, f"strategy.name='{name}'", *settings)

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(args(reference))
    assert run_until_killed(args(killed), killed, after_rows=2) < 3
    run([sys.executable, "-m", "fedlayer.cli", "run", "--resume", str(killed)])
    rows = metrics(killed)
    assert rows == metrics(reference)
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["clients_trained"] == 3 for r in rows)
    assert_same_model(killed / "model.pt", reference / "model.pt")
    for log in reference.glob("layers_by_round.json"):  # lmc: the decisions and their evidence
        assert (killed / log.name).read_text() == log.read_text()
    states = sorted((killed / "clients").glob("partition-*/*.pt"))
    assert states
    saved = torch.load(states[-1], weights_only=True)
    for state in ALGORITHMS[name].state:
        assert any(k.startswith(f"state.{state}.") for k in saved), f"client state {state} kept on disk"
