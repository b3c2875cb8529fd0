"""Every algorithm in the real simulation engine (3 clients x 2 rounds), plus what each one promises; the
methods beyond a block split (Ditto, FedALA, FedRoD, FedDBE, FedCAC, FedCP, GPFL) with the analysis hook
on (one simulation per algorithm serves every test here: CI's time budget)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from sim_helpers import ray_cluster

from fedlayer.config import load_config
from fedlayer.experiment import federated_data, initial_model
from fedlayer.run.readers import read_barriers
from fedlayer.run.rundir import RunDir
from fedlayer.simulation import simulate
from fedlayer.training import evaluate
from strategies import ALGORITHMS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
HOOK = ["analysis.every=2", "analysis.max_clients=2", "analysis.samples=64"]
EXTRA = {
    "partial": ["strategy.shared=['conv1', 'conv2']"],
    "fedbn": ["model.norm='batch'"],
    "fedprox": ["data.pool='train+test'"],  # the server takes the global metrics from the clients
    "ditto": ["strategy.ditto_mu=0.1", *HOOK],  # PFLlib's default 0 would leave the pull untested
    "fedala": HOOK,
    "fedrod": HOOK,
    "feddbe": ["strategy.dbe_kl_weight=1.0", *HOOK],  # PFLlib's 0 would leave the regularizer untested
    "fedcac": ["strategy.cac_beta=1", *HOOK],  # from round 2 on no client collaborates: customized = own
    "fedcp": HOOK,
    "gpfl": ["strategy.gpfl_mu=0.01", *HOOK],  # PFLlib's 0 would leave the decay untested
}
METHODS = ["ditto", "fedala", "fedrod", "feddbe", "fedcac", "fedcp", "gpfl"]


def simulated(data_root: Path, out: Path, name: str, ray_address: str) -> RunDir:
    overrides = [
        f"data.root='{data_root}'",
        f"federation.ray_address='{ray_address}'",
        "data.min_partition_size=5",
        "federation.clients=3",
        "federation.rounds=2",
        "train.batch_size=16",
        f"strategy.name='{name}'",
        *EXTRA.get(name, []),
    ]
    run = RunDir.create(out)
    simulate(load_config(ROOT / "experiments" / "default.toml", overrides), run)
    return run


@pytest.fixture(scope="module")
def runs(tiny_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunDir]:
    """All algorithms, one after the other in this process, on one Ray cluster (a private Ray's start and
    stop, ~8 CPU-s, saved per algorithm; the private path is every other simulation test's)."""
    base = tmp_path_factory.mktemp("algorithms")
    with ray_cluster(nodes=1, cpus=os.cpu_count() or 1) as (address, _):
        return {name: simulated(tiny_fmnist, base / name, name, address) for name in ALGORITHMS}


def state(run: RunDir, name: str) -> dict[str, torch.Tensor]:
    return torch.load(run.file(name), weights_only=True)


def shared_bytes(run: RunDir, row: dict[str, Any]) -> int:
    """Bytes of the blocks shared in ``row``'s round (``lmc`` changes them; the others keep layers.json's)."""
    layers = json.loads(run.file("layers.json").read_text())
    blocks = row.get("shared_blocks", layers["shared_blocks"])
    model = state(run, "initial_model.pt")
    return sum(model[k].numel() * model[k].element_size() for b in blocks for k in layers["blocks"][b])


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_algorithm_runs_two_rounds(runs: dict[str, RunDir], name: str) -> None:
    rows = runs[name].read_jsonl()
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_trained"] == 3 for r in rows)
    assert rows[-1]["personalized_acc"] > 0.3


SPLITS = ["fedper", "fedrep", "fedbabu", "lgfedavg", "fedbn", "partial", "local"]


@pytest.mark.parametrize("name", [*SPLITS, "fedrod", "feddbe", "fedcp", "gpfl"])
def test_personal_keys_stay_at_the_initial_values_on_the_server(runs: dict[str, RunDir], name: str) -> None:
    run = runs[name]
    personal = json.loads(run.file("layers.json").read_text())["personal_keys"]
    initial, final = state(run, "initial_model.pt"), state(run, "model.pt")
    assert personal
    assert all(torch.equal(initial[k], final[k]) for k in personal)
    shared = set(initial) - set(personal)
    assert not shared or any(not torch.equal(initial[k], final[k]) for k in shared)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_bytes_up_is_the_shared_payload(runs: dict[str, RunDir], name: str) -> None:
    rows = runs[name].read_jsonl()
    if name in METHODS:  # round 2 is an analysis round: full models travel (tests/test_analysis_hook.py)
        rows = rows[:1]
    for row in rows:
        payload = shared_bytes(runs[name], row)
        if ALGORITHMS[name].per_client:  # the critical mask too: one byte per parameter (no buffers here)
            payload += sum(v.numel() for v in state(runs[name], "initial_model.pt").values())
        # Flower counts the key names too: a few bytes per array on top of the data.
        assert 3 * payload <= row["bytes_up"] <= 3 * payload + 3 * 4096


@pytest.mark.parametrize(("name", "derived"), [("fedprox", 2), ("fedavg", 0)])
def test_global_metrics_equal_an_evaluation_of_the_final_model(
    runs: dict[str, RunDir], name: str, derived: int
) -> None:
    """FedProx on pooled data: the server evaluates nothing itself (the clients' evaluate phase covered its
    test set with the global model); FedAvg on the dataset's own test set: the server evaluates."""
    run = runs[name]
    cfg = load_config(run.file("config.resolved.toml"))
    data = federated_data(cfg)
    model = initial_model(cfg, data.test)
    model.load_state_dict(state(run, "model.pt"))
    loss, acc = evaluate(model, data.test.x, data.test.y, device=torch.device("cpu"))
    last = run.read_jsonl()[-1]
    assert json.loads(run.file("summary.json").read_text())["global_from_clients"] == derived
    assert last["global_acc"] == pytest.approx(acc, abs=1e-12)
    assert last["global_loss"] == pytest.approx(loss, rel=1e-5)
    if derived:
        assert last["global_acc"] == last["personalized_acc_pooled"]


def test_lmc_uploads_only_the_blocks_it_still_shares(runs: dict[str, RunDir]) -> None:
    first, second = runs["lmc"].read_jsonl()
    assert len(second["shared_blocks"]) < len(first["shared_blocks"]), "the tiny run turns a block personal"
    assert second["bytes_up"] < first["bytes_up"]


def test_fedper_sends_less_than_fedavg(runs: dict[str, RunDir]) -> None:
    assert runs["fedper"].read_jsonl()[0]["bytes_up"] < runs["fedavg"].read_jsonl()[0]["bytes_up"]
    assert runs["local"].read_jsonl()[0]["bytes_up"] == 0


@pytest.mark.parametrize("name", METHODS)
def test_method_learns_and_the_hook_measures_it(runs: dict[str, RunDir], name: str) -> None:
    last = runs[name].read_jsonl()[-1]
    assert last["personalized_acc_pooled"] > 0.3
    barriers = read_barriers(runs[name].path)
    full = barriers[(barriers["kind"] == "full") & (barriers["round"] == 2)]
    assert len(full) > 0, "the hook measured round 2"
    assert full["barrier"].notna().all()


def test_fedbabu_head_never_changes(runs: dict[str, RunDir]) -> None:
    run = runs["fedbabu"]
    initial, final = state(run, "initial_model.pt"), state(run, "model.pt")
    assert torch.equal(initial["fc2.weight"], final["fc2.weight"])
    client_states = sorted(run.path.glob("clients/partition-*/*.pt"))
    assert client_states, "clients keep their personal head in the run directory in simulation"
    for path in client_states:
        personal = torch.load(path, weights_only=True)
        if "fc2.weight" in personal:
            assert torch.equal(personal["fc2.weight"], initial["fc2.weight"])


def test_fedcac_sends_each_client_its_customized_model_and_keeps_its_mask(runs: dict[str, RunDir]) -> None:
    """Round 1's evaluate instructions and all of round 2's carry a customized model (one per client, 3
    clients), round 1's train instructions none; each client keeps a critical mask of half its parameters."""
    run = runs["fedcac"]
    first, second = run.read_jsonl()
    model = sum(v.numel() * v.element_size() for v in state(run, "initial_model.pt").values())
    assert 3 * model <= second["bytes_down"] - first["bytes_down"] <= 3 * model + 3 * 4096
    saved = [torch.load(p, weights_only=True) for p in sorted(run.path.glob("clients/partition-*/*.pt"))]
    masks = [{k: v for k, v in s.items() if k.startswith("state.critical.")} for s in saved]
    assert len(masks) == 3 and all(m for m in masks)
    for mask in masks:
        assert all(v.dtype == torch.bool for v in mask.values())
        share = sum(int(v.sum()) for v in mask.values()) / sum(v.numel() for v in mask.values())
        assert 0.49 <= share <= 0.55  # strategy.cac_tau = 0.5 per tensor (ties at the threshold count)
