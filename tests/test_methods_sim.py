"""The methods beyond a block split in the real simulation engine, on tiny settings (3 clients): all of them
in one `fedlayer compare` with the analysis hook on; per method, a run killed with SIGKILL after round 2 and
resumed ends exactly like the uninterrupted run (client state, model extensions and checkpoints survive, and
runs are deterministic). ``tests/test_algorithms.py`` runs every registry name too (bytes on the wire).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from sim_helpers import assert_same_model, cli_args, metrics, run
from test_resume import run_until_killed

from fedlayer.cli import main
from fedlayer.compare import Variant
from strategies import ALGORITHMS

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow
METHODS = {
    "ditto": ["strategy.ditto_mu=0.1"],  # PFLlib's default 0 would leave the pull untested
    "fedala": [],
    "fedrod": [],
    "feddbe": ["strategy.dbe_kl_weight=1.0"],  # PFLlib's default 0 would leave the regularizer untested
}
TINY = ("federation.clients=3", "federation.fraction_train=1.0")


def args(data: Path, out: Path, name: str) -> list[str]:
    return cli_args(data, out, *TINY, "federation.rounds=3", f"strategy.name='{name}'", *METHODS[name])


# One method with client state (FedALA, whose first round differs), one with a model extension and state
# (FedDBE); Ditto's state and FedRoD's extension take the same paths (CI's time budget).
@pytest.mark.parametrize("name", ["fedala", "feddbe"])
def test_method_resumes_after_sigkill_to_the_uninterrupted_result(
    name: str, tiny_fmnist: Path, tmp_path: Path
) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(args(tiny_fmnist, reference, name))
    assert run_until_killed(args(tiny_fmnist, killed, name), killed, after_rows=2) < 3
    run([sys.executable, "-m", "fedlayer.cli", "run", "--resume", str(killed)])
    rows = metrics(killed)
    assert rows == metrics(reference)
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["clients_trained"] == 3 for r in rows)
    assert_same_model(killed / "model.pt", reference / "model.pt")
    states = sorted((killed / "clients").glob("partition-*/*.pt"))
    assert states
    saved = torch.load(states[-1], weights_only=True)
    for state in ALGORITHMS[name].state:
        assert any(k.startswith(f"state.{state}.") for k in saved), f"client state {state} kept on disk"


def test_compare_runs_every_method_with_the_analysis_hook(tiny_fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    specs = {name: f"{name}{{{';'.join(extra)}}}" if extra else name for name, extra in METHODS.items()}
    args = ["compare", str(ROOT / "experiments" / "default.toml"), "--strategies", ",".join(specs.values())]
    args += ["--seeds", "0"]
    args += ["--out", str(out)]
    for item in (
        f"data.root='{tiny_fmnist}'",
        "data.min_partition_size=5",
        "federation.clients=3",
        "federation.rounds=2",
        "train.batch_size=16",
        "analysis.every=2",
        "analysis.max_clients=2",
        "analysis.samples=64",
    ):
        args += ["--set", item]
    assert main(args) == 0
    with open(out / "table.csv", newline="") as fh:
        rows = {row["strategy"]: row for row in csv.DictReader(fh)}
    for name, spec in specs.items():
        variant = Variant.parse(spec)
        assert float(rows[variant.label]["final_personalized_acc_pooled"]) > 0.3, name
        assert rows[variant.label]["final_full_barrier"] not in ("", "nan"), f"{name}: the hook measured it"
