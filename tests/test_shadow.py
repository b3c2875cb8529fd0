"""`lmc` with shadows of the tail blocks (`strategy.lmc_criterion = "shadow"`): the shadows leave the model's
own training unchanged, follow the other regime's trajectory, the held-out gains have the right sign, the
running rule with hysteresis, the server's reference from the shadows, toy federations whose right answer is
known, and one real simulation."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from sim_helpers import assert_same_model, metrics, ray_cluster
from torch import nn

from fedlayer.client import shadow
from fedlayer.client.app import ClientJob
from fedlayer.client.store import PersonalStore
from fedlayer.config import ConfigError, load_config
from fedlayer.contract import MIX_PREFIX, REFERENCE, SHADOW, SHADOW_PREFIX
from fedlayer.data import TensorData
from fedlayer.layers import resolve
from fedlayer.models import build_model, model_blocks, tail_blocks
from fedlayer.run.rundir import RunDir
from fedlayer.simulation import simulate
from fedlayer.training import train_epochs
from strategies.algorithms import get_algorithm
from strategies.lmc import ShadowPolicy, ShadowRule, lmc_policy
from strategies.mechanism import PartialStrategy

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SHADOW_CFG = ["strategy.name='lmc'", "strategy.lmc_criterion='shadow'"]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


# --------------------------------------------------------------------------- the model's tail


@pytest.mark.parametrize("name", ["cnn", "pfllib_cnn", "mlp"])
def test_the_tail_computes_the_logits_from_the_first_tail_blocks_input(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 10, 1, 28).eval()
    x = torch.randn(4, 1, 28, 28)
    with shadow.tail_input(model) as seen:
        logits = model(x)
    assert torch.equal(model.tail(seen[0]), logits)
    assert tail_blocks(model)[-1] == model.HEAD_BLOCKS[-1]  # the tail ends in the classifier


def test_a_model_without_a_tail_is_refused_by_name() -> None:
    cfg = load_config(None, [*SHADOW_CFG, "model.name='resnet18'", "data.dataset='cifar10'"])
    model = build_model("resnet18", 10, 3, 32)
    with pytest.raises(ConfigError, match="^strategy.lmc_criterion: 'shadow' needs a model with a tail"):
        lmc_policy(cfg.strategy, model, resolve(get_algorithm(cfg.strategy).selector(cfg.strategy), model))


def test_shadow_needs_a_decision_every_round() -> None:
    with pytest.raises(ConfigError, match="^strategy.lmc_every: 2 is not allowed; 1 with"):
        load_config(None, [*SHADOW_CFG, "strategy.lmc_every=2"])
    load_config(None, [*SHADOW_CFG, "strategy.lmc_finetune=2"])  # the held-out slice exists: allowed


# --------------------------------------------------------------------------- the client's shadows


def client_job(tmp_path: Path, received: list[str], own: bool = True, *overrides: str) -> ClientJob:
    """A ClientApp job of ``lmc`` shadow on 100 random images: a CNN whose ``received`` blocks came from the
    server (another initialization); its own copy (``own``) is the first initialization."""
    cfg = load_config(None, [*SHADOW_CFG, "train.batch_size=20", "train.lr=0.05", *overrides])
    torch.manual_seed(0)
    model = build_model("cnn", 10, 1, 28)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    server = build_model("cnn", 10, 1, 28).state_dict()  # another init
    blocks = model_blocks(model)
    incoming = {k: server[k].clone() for b in received for k in blocks[b]}
    model.load_state_dict(incoming, strict=False)
    gen = torch.Generator().manual_seed(0)
    data = TensorData(
        torch.randn(100, 1, 28, 28, generator=gen), torch.randint(0, 10, (100,), generator=gen), 10
    )
    return ClientJob(
        cfg, 0, 2, model, data, data, CPU, list(incoming), incoming, PersonalStore(tmp_path), {}, {},
        kept if own else {},
    )  # fmt: skip


def test_shadows_leave_the_models_own_training_unchanged(tmp_path: Path) -> None:
    """The shadows' losses reach the shadows alone: the model ends exactly where plain SGD takes it."""
    job = client_job(tmp_path, ["conv1", "conv2", "fc1"])
    task = job.task()
    plain = copy.deepcopy(task.model)
    generator = copy.deepcopy(task.generator)
    loss, gains = shadow.train_with_shadows(job, task, None)
    expected = train_epochs(plain, task.x, task.y, task.train, epochs=1, device=CPU, generator=generator)
    assert loss == pytest.approx(expected, rel=1e-6)
    for key, value in plain.state_dict().items():
        assert torch.equal(task.model.state_dict()[key], value), key
    assert shadow.SHADOW_MODULE not in dict(task.model.named_children())
    assert set(gains) == {SHADOW_PREFIX + "fc1", SHADOW_PREFIX + "fc2"}


def test_each_shadow_follows_the_other_regimes_trajectory(tmp_path: Path) -> None:
    """fc1 shared: its shadow starts from the client's first-round value (the server's) and is trained; fc2
    personal: its shadow starts from the server's reference and goes up in the reply's shadow record."""
    job = client_job(tmp_path, ["conv1", "conv2", "fc1"])
    task = job.task()
    reference = {
        k: torch.full_like(v, 0.01) for k, v in job.model.state_dict().items() if k.startswith("fc2")
    }
    start, personal_role = shadow.start_values(job, task, ArrayRecord(reference))
    assert personal_role == {"fc1": True, "fc2": False}
    assert torch.equal(start["fc1.weight"], job.incoming["fc1.weight"])
    assert torch.equal(start["fc2.weight"], reference["fc2.weight"])
    shadow.train_with_shadows(job, task, ArrayRecord(reference))
    kept = task.entry(shadow.SHADOW_STATE)
    assert not torch.equal(kept["fc1.weight"], start["fc1.weight"])  # trained
    # its first round: the same start and the same tail as the model's copy, so the same path as the model's
    assert torch.allclose(kept["fc1.weight"], task.model.state_dict()["fc1.weight"])
    assert {k: float(v) for k, v in task.entry(shadow.ROLE_STATE).items()} == {"fc1": 1.0, "fc2": 0.0}
    assert set(task.upload[SHADOW]) == {"fc2.weight", "fc2.bias"}
    assert torch.equal(task.upload[SHADOW]["fc2.weight"], kept["fc2.weight"])
    uploaded = shadow.uploaded_keys(job, task)  # a full-model reply outside analysis rounds: no own fc2
    assert uploaded == [k for k in job.model.state_dict() if not k.startswith("fc2.")]


def test_a_shadow_that_changes_role_starts_from_the_copy_on_the_other_path(tmp_path: Path) -> None:
    job = client_job(tmp_path, ["conv1", "conv2", "fc1", "fc2"])
    task = job.task()
    marker = {k: torch.full_like(v, 7.0) for k, v in job.model.state_dict().items() if k.startswith("fc")}
    task.keep(shadow.SHADOW_STATE, marker)
    task.keep(shadow.ROLE_STATE, {"fc1": torch.tensor(1.0), "fc2": torch.tensor(0.0)})
    start, _ = shadow.start_values(job, task, None)
    assert torch.equal(start["fc1.weight"], marker["fc1.weight"])  # still the personal path: continues
    assert torch.equal(start["fc2.weight"], job.own["fc2.weight"])  # fc2 was personal: its own copy


class TwoClass(nn.Module):
    """A linear tail of two blocks on 2-d inputs (``tail`` is the whole model)."""

    HEAD_BLOCKS: ClassVar[tuple[str, ...]] = ("head",)
    TAIL_BLOCKS: ClassVar[tuple[str, ...]] = ("body", "head")

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(x)

    def tail(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(z)))


Tensors = dict[str, torch.Tensor]


def toy_job(
    model: TwoClass, data: TensorData, received: Tensors, own: Tensors, c: int, server_round: int,
    state: Tensors, tmp_path: Path,
) -> ClientJob:  # fmt: skip
    cfg = load_config(None, [*SHADOW_CFG, "train.batch_size=32", "train.lr=0.2", "strategy.lmc_holdout=0.25"])
    return ClientJob(
        cfg, c, server_round, model, data, data, CPU, list(received), received, PersonalStore(tmp_path),
        dict(state), {}, own,
    )  # fmt: skip


def toy_federation(flips: list[bool], tmp_path: Path, rounds: int = 8, n: int = 256) -> ShadowPolicy:
    """Clients with the same four Gaussian classes in 2-d, labelled 0 / 1 by the sign of x + y, or the
    opposite where ``flips[c]`` (a concept shift), run through the client's own shadow code; the server
    averages the shared blocks and, for personal ones, the clients' shadows, and decides every round by
    :class:`ShadowPolicy`."""
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    data = []
    for flip in flips:
        k = torch.randint(4, (n,), generator=gen)
        x = means[k] + 0.7 * torch.randn(n, 2, generator=gen)
        data.append(TensorData(x, (k + int(flip)) % 2, 2))
    torch.manual_seed(0)
    model = TwoClass()
    blocks = model_blocks(model)
    p = ShadowPolicy(blocks, list(blocks), reshare=True, tail=("body", "head"), shadow=ShadowRule(0.5, 0.005))
    server = {k: v.clone() for k, v in model.state_dict().items()}
    owns: list[dict[str, torch.Tensor]] = [{} for _ in flips]
    states: list[dict[str, torch.Tensor]] = [{} for _ in flips]
    for server_round in range(1, rounds + 1):
        p.record(server_round)
        shared = [k for b in p.shared_blocks() for k in blocks[b]]
        personal = [k for k in server if k not in shared]
        reference = ArrayRecord({k: server[k] for k in p.reference_keys(personal)}) if personal else None
        reports, uploads = [], []
        for c, examples in enumerate(data):
            model.load_state_dict(owns[c] or server)
            received = {k: server[k].clone() for k in shared}
            model.load_state_dict(received, strict=False)
            job = toy_job(model, examples, received, owns[c], c, server_round, states[c], tmp_path)
            task = job.task()
            _, gains = shadow.train_with_shadows(job, task, reference)
            states[c], owns[c] = task.state, {k: v.clone() for k, v in model.state_dict().items()}
            reports.append({k[len(SHADOW_PREFIX) :]: v for k, v in gains.items()})
            uploads.append(owns[c] | task.upload.get(SHADOW, {}))
        server = {k: torch.stack([u[k] for u in uploads]).mean(0) for k in server}
        p.decide(server_round, reports, [1.0] * len(flips))
    return p


def test_identical_clients_keep_every_tail_block_shared(tmp_path: Path) -> None:
    p = toy_federation([False] * 3, tmp_path)
    assert all(shared == ["body", "head"] for shared in p.history.values())
    assert all(g > -0.005 for g in p.running.values())


def test_clients_with_opposite_labels_turn_the_head_personal(tmp_path: Path) -> None:
    """The same inputs, opposite labels: no shared head serves both clients."""
    p = toy_federation([False, True], tmp_path)
    assert p.running["head"] < -0.005 and "head" not in p.shared_blocks()


# --------------------------------------------------------------------------- the server's rule


def test_running_gain_with_hysteresis_turns_a_block_personal_and_shared_again() -> None:
    blocks = {"conv": ["conv.weight"], "fc1": ["fc1.weight"], "fc2": ["fc2.weight"]}
    p = ShadowPolicy(blocks, list(blocks), reshare=True, tail=("fc1", "fc2"), shadow=ShadowRule(0.5, 0.01))
    steps = [(-0.01, True), (-0.03, False), (0.0, False), (0.05, True), (-0.02, True)]
    # running: -0.01 (shares at -margin), -0.02 (personal), -0.01, 0.02 (shared again), 0.0
    for server_round, (gain, shared) in enumerate(steps, start=1):
        p.record(server_round)
        p.decide(server_round, [{"conv": 0.9, "fc1": 0.2, "fc2": gain}], [1.0])
        assert ("fc2" in p.shared_blocks()) is shared, server_round
    assert "fc1" in p.shared_blocks()  # a tail block's report is a gain (0.2 > 0), not a mixing weight
    again = ShadowPolicy(
        blocks, list(blocks), reshare=True, tail=("fc1", "fc2"), shadow=ShadowRule(0.5, 0.01)
    )
    again.load_state(json.loads(json.dumps(p.state())))  # as a checkpoint stores it
    assert again.state() == p.state() and again.running == pytest.approx({"fc1": 0.2, "fc2": 0.0})


def test_the_gains_are_averaged_by_samples_and_lower_blocks_use_their_weights() -> None:
    blocks = {"conv": ["conv.weight"], "fc1": ["fc1.weight"], "fc2": ["fc2.weight"]}
    p = ShadowPolicy(blocks, list(blocks), reshare=True, tail=("fc1", "fc2"))
    p.decide(1, [{"conv": 0.1, "fc2": -0.03}, {"conv": 0.2, "fc2": 0.03, "fc1": 0.1}], [3.0, 1.0])
    assert p.gains[1] == pytest.approx({"fc2": -0.015, "fc1": 0.1})
    assert p.shared_blocks() == ["fc1"]  # conv's weights 0.1 / 0.2 < 0.4; fc2 below -margin
    assert p.logged(1) == {
        "weights": {"conv": pytest.approx(0.125)},
        "gains": p.gains[1],
        "running": p.running,
    }


def shadow_reply(node: int, value: float, shadow_value: float | None, gains: dict[str, float]) -> Message:
    record = MetricRecord(
        {"num-examples": 10, "partition-id": node, MIX_PREFIX + "conv": 0.9}
        | {SHADOW_PREFIX + b: g for b, g in gains.items()}
    )
    state = {key: torch.full((2,), value) for key in ("conv.weight", "fc1.weight", "fc2.weight")}
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": record})
    if shadow_value is not None:
        content[SHADOW] = ArrayRecord({"fc2.weight": torch.full((2,), shadow_value)})
    return Message(content, dst_node_id=node + 1, message_type=MessageType.TRAIN)


class Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_the_reference_of_a_personal_tail_block_is_the_average_of_the_clients_shadows() -> None:
    blocks = {"conv": ["conv.weight"], "fc1": ["fc1.weight"], "fc2": ["fc2.weight"]}
    p = ShadowPolicy(blocks, ["conv", "fc1"], reshare=True, tail=("fc1", "fc2"))
    p.referenced = set(blocks)
    strategy = PartialStrategy(FedAvg(min_available_nodes=2), [], sharing=p)
    zeros = ArrayRecord({key: torch.zeros(2) for keys in blocks.values() for key in keys})
    messages = list(strategy.configure_train(1, zeros, ConfigRecord(), Grid()))  # type: ignore[arg-type]
    assert list(messages[0].content[REFERENCE].keys()) == ["fc2.weight"]
    replies = [shadow_reply(0, 1.0, 10.0, {"fc1": 0.1, "fc2": 0.2}), shadow_reply(1, 3.0, 20.0, {"fc1": 0.1})]
    merged, aggregated = strategy.aggregate_train(1, replies)
    assert merged is not None
    np.testing.assert_allclose(merged["fc2.weight"].numpy(), 15.0)  # the shadows, not the own copies (2.0)
    np.testing.assert_allclose(merged["fc1.weight"].numpy(), 2.0)
    assert p.gains[1] == pytest.approx({"fc1": 0.1, "fc2": 0.2}) and p.shared_blocks() == [
        "conv",
        "fc1",
        "fc2",
    ]
    assert aggregated is not None and not any(k.startswith((SHADOW_PREFIX, MIX_PREFIX)) for k in aggregated)


# --------------------------------------------------------------------------- a real simulation


def simulated(data_root: Path, out: Path, ray_address: str) -> RunDir:
    overrides = [
        f"data.root='{data_root}'",
        f"federation.ray_address='{ray_address}'",
        "data.min_partition_size=5",
        "federation.clients=3",
        "federation.rounds=3",
        "train.batch_size=16",
        "model.name='pfllib_cnn'",
        *SHADOW_CFG,
    ]
    run = RunDir.create(out)
    simulate(load_config(ROOT / "experiments" / "default.toml", overrides), run)
    return run


@pytest.mark.slow
def test_shadow_runs_in_the_simulation_logs_its_gains_and_is_deterministic(
    tiny_fmnist: Path, tmp_path: Path
) -> None:
    """3 clients x 3 rounds, twice on one Ray cluster: the same gains, shared sets, metrics and model; the
    tail blocks get gains from round 1 (a shadow needs no earlier copy), the lower blocks weights from round
    2; the clients keep their shadows as client state."""
    with ray_cluster(nodes=1, cpus=os.cpu_count() or 1) as (address, _):
        a, b = (simulated(tiny_fmnist, tmp_path / name, address) for name in "ab")
    history = json.loads(a.file("layers_by_round.json").read_text())
    assert history == json.loads(b.file("layers_by_round.json").read_text())
    assert metrics(a.path) == metrics(b.path)
    assert_same_model(a.file("model.pt"), b.file("model.pt"))
    rounds = history["rounds"]
    assert set(rounds["1"]["gains"]) == {"fc1", "fc2"} and rounds["1"]["weights"] == {}
    assert set(rounds["2"]["weights"]) == {"conv1", "conv2"}
    rows = a.read_jsonl()
    assert [r["shared_blocks"] for r in rows] == [rounds[str(r["round"])]["shared"] for r in rows]
    # round 1 shares every block (FedAvg's uplink); shadows of personal tail blocks replace their own copies
    assert all(r["bytes_up"] <= rows[0]["bytes_up"] for r in rows)
    saved = torch.load(sorted(a.file("clients").glob("partition-0/round-*.pt"))[-1], weights_only=True)
    assert {k for k in saved if k.startswith("state.shadow.")} == {
        f"state.shadow.{k}" for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    }
