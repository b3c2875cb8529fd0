"""`lmc` with learned mixing per block (`strategy.lmc_criterion = "mixing"`): the weight-learning step, the
decision rule with hysteresis, toy federations whose right answer is known, and one real simulation."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from sim_helpers import assert_same_model, metrics, ray_cluster
from torch import nn

from fedlayer.client import lmc
from fedlayer.client.app import ClientJob
from fedlayer.client.lmc import holdout_split, learn_weights, mixed_state
from fedlayer.client.store import PersonalStore
from fedlayer.config import ConfigError, StrategyConfig, load_config
from fedlayer.contract import MIX_PREFIX, REFERENCE
from fedlayer.data import TensorData
from fedlayer.layers import resolve
from fedlayer.models import build_model, model_blocks
from fedlayer.run.rundir import RunDir
from fedlayer.simulation import simulate
from strategies.algorithms import get_algorithm
from strategies.lmc import MixingPolicy, MixingRule, lmc_policy
from strategies.mechanism import PartialStrategy

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
BLOCKS = {name: [f"{name}.weight"] for name in ("conv1", "bn1", "conv2", "fc1", "fc2")}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


# --------------------------------------------------------------------------- the client's weights


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def linear_problem() -> tuple[
    Linear, dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor
]:
    gen = torch.Generator().manual_seed(0)
    model = Linear()
    own = {"fc.weight": torch.randn(2, 3, generator=gen), "fc.bias": torch.randn(2, generator=gen)}
    server = {"fc.weight": torch.randn(2, 3, generator=gen), "fc.bias": torch.randn(2, generator=gen)}
    x, y = torch.randn(5, 3, generator=gen), torch.tensor([0, 1, 1, 0, 1])
    return model, own, server, x, y


def test_one_step_follows_the_hand_computed_gradient_of_the_held_out_loss() -> None:
    """θ(w) = θ_own + w Δ; for softmax regression dL/dW = Gᵀx, dL/db = Σ G with G = (p − onehot)/n, so
    dL/dw = ⟨Gᵀx, ΔW⟩ + ⟨ΣG, Δb⟩; one step: w − η dL/dw."""
    model, own, server, x, y = linear_problem()
    w0, lr = 0.3, 0.7
    blocks = {"fc": ["fc.weight", "fc.bias"]}
    learned = learn_weights(model, own, server, blocks, {"fc": w0}, x, y, steps=1, lr=lr, device=CPU)
    a, b = own["fc.weight"].double().numpy(), own["fc.bias"].double().numpy()
    dw, db = server["fc.weight"].double().numpy() - a, server["fc.bias"].double().numpy() - b
    logits = x.double().numpy() @ (a + w0 * dw).T + (b + w0 * db)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - np.eye(2)[y.numpy()]) / len(y)
    grad = np.sum((g.T @ x.double().numpy()) * dw) + np.sum(g.sum(0) * db)
    assert grad != 0
    assert learned["fc"] == pytest.approx(w0 - lr * grad, abs=1e-6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learn_weights(model, own, server, blocks, {"fc": w0}, x, y, steps=3, lr=lr, device=CPU)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Norm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def test_the_weight_of_a_norm_block_sees_its_running_statistics_only_when_asked() -> None:
    """Logits = batch norm (eval mode) of the inputs; own and server differ in running means only. Without
    ``statistics`` the weight gets no gradient; with it, the one-sided difference matches the hand
    derivative dL/dw = Σ_j ⟨G_j, −Δμ_j / √(σ²_j + ε)⟩ (G = (p − onehot)/n) to the step's O(h)."""
    gen = torch.Generator().manual_seed(1)
    model = Norm()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    server = own | {"bn.running_mean": torch.tensor([1.5, -1.0])}
    blocks = {"bn": list(own)}
    x, y = torch.randn(8, 2, generator=gen), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    w0, lr = 0.5, 0.1
    kw = {"steps": 1, "lr": lr, "device": CPU}
    assert learn_weights(model, own, server, blocks, {"bn": w0}, x, y, **kw) == {"bn": w0}
    learned = learn_weights(model, own, server, blocks, {"bn": w0}, x, y, statistics=True, **kw)
    eps, delta = model.bn.eps, server["bn.running_mean"].double().numpy()
    logits = (x.double().numpy() - w0 * delta) / np.sqrt(1.0 + eps)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - np.eye(2)[y.numpy()]) / len(y)
    grad = np.sum(g * (-delta / np.sqrt(1.0 + eps)))
    assert abs(grad) > 0.05
    assert learned["bn"] == pytest.approx(w0 - lr * grad, abs=0.01 * abs(grad))


def test_weights_are_clamped_to_the_unit_interval() -> None:
    """A server block that fits the held-out data and an own block that does not: a big step reaches 1 and
    stops there; the other way round, 0."""
    model, own, _, x, y = linear_problem()
    fit = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.where(torch.arange(2) == 1, 5.0, -5.0)}
    blocks = {"fc": ["fc.weight", "fc.bias"]}
    y = torch.ones(5, dtype=torch.long)
    toward = learn_weights(model, own, fit, blocks, {"fc": 0.5}, x, y, steps=3, lr=1e3, device=CPU)
    away = learn_weights(model, fit, own, blocks, {"fc": 0.5}, x, y, steps=3, lr=1e3, device=CPU)
    assert toward == {"fc": 1.0} and away == {"fc": 0.0}


def test_mixed_state_interpolates_floats_and_takes_the_servers_integers() -> None:
    own = {"bn.weight": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(3)}
    server = {"bn.weight": torch.full((2,), 4.0), "bn.num_batches_tracked": torch.tensor(7)}
    mixed = mixed_state(own, server, {"bn": list(own)}, {"bn": 0.25})
    assert torch.equal(mixed["bn.weight"], torch.full((2,), 1.0))
    assert int(mixed["bn.num_batches_tracked"]) == 7


def test_the_held_out_slice_is_a_fixed_fraction_with_a_minimum_and_at_most_half() -> None:
    strategy = StrategyConfig(lmc_holdout=0.1, lmc_holdout_min=8)
    for n, size in ((1000, 100), (40, 8), (10, 5), (1, 0)):
        train, held = holdout_split(n, strategy, torch.Generator().manual_seed(0))
        assert len(held) == size and len(train) == n - size
        assert not set(train.tolist()) & set(held.tolist())
    a = holdout_split(100, strategy, torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, holdout_split(100, strategy, torch.Generator().manual_seed(3))[1])


def client_job(tmp_path: Path, own: bool, *overrides: str) -> ClientJob:
    """A ClientApp job of ``lmc`` mixing on 100 random images: a CNN whose blocks all came from the server
    (another initialization); its own copy (``own``) is the first initialization."""
    cfg = load_config(
        None,
        ["strategy.name='lmc'", "strategy.lmc_criterion='mixing'", "strategy.lmc_mix_steps=2", *overrides],
    )
    torch.manual_seed(0)
    model = build_model("cnn", 10, 1, 28)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    incoming = {k: v.clone() for k, v in build_model("cnn", 10, 1, 28).state_dict().items()}  # another init
    model.load_state_dict(incoming)
    gen = torch.Generator().manual_seed(0)
    data = TensorData(
        torch.randn(100, 1, 28, 28, generator=gen), torch.randint(0, 10, (100,), generator=gen), 10
    )
    return ClientJob(
        cfg, 0, 2, model, data, data, CPU, list(incoming), incoming, PersonalStore(tmp_path), {}, {},
        kept if own else {},
    )  # fmt: skip


def test_the_client_trains_without_its_held_out_slice_and_starts_from_the_mixed_model(tmp_path: Path) -> None:
    job = client_job(tmp_path, own=True)
    task = job.task()
    train, held = lmc.split(job)
    assert len(held) == 32 and len(task.y) == 68  # lmc_holdout_min; the rest trains
    assert torch.equal(task.x, job.train_data.x[train])
    reported = lmc.mix(job, task, None)
    blocks = model_blocks(job.model)
    assert set(reported) == {MIX_PREFIX + b for b in blocks}
    weights = {b: reported[MIX_PREFIX + b] for b in blocks}
    x, y = job.train_data.x[held], job.train_data.y[held]
    ones = dict.fromkeys(blocks, 1.0)
    alone = learn_weights(job.model, job.own, job.incoming, blocks, ones, x, y, steps=2, lr=1.0, device=CPU)
    assert weights == pytest.approx(alone) and any(w < 1.0 for w in weights.values())
    expected = mixed_state(job.own, job.incoming, blocks, weights)
    assert all(torch.allclose(job.model.state_dict()[k], v) for k, v in expected.items())
    assert {k: float(v) for k, v in task.entry("mix").items()} == weights  # kept as client state
    first = client_job(tmp_path, own=False)
    first_task = first.task()
    assert lmc.mix(first, first_task, None) == {}  # no own copy yet: nothing learned, nothing reported
    assert all(torch.equal(v, first.incoming[k]) for k, v in first.model.state_dict().items())


def test_evidence_only_weights_are_learned_and_reported_but_training_starts_from_the_server(
    tmp_path: Path,
) -> None:
    mixed = client_job(tmp_path / "mixed", True)
    reported = lmc.mix(mixed, mixed.task(), None)
    job = client_job(tmp_path / "evidence", True, "strategy.lmc_mix_train=false")
    task = job.task()
    assert lmc.mix(job, task, None) == pytest.approx(reported)  # the same evidence
    assert any(w < 1.0 for w in reported.values())
    assert all(torch.equal(v, job.incoming[k]) for k, v in job.model.state_dict().items())
    lmc.apply_weights(job, task)  # evaluation: the server's blocks, unmixed
    assert all(torch.equal(v, job.incoming[k]) for k, v in job.model.state_dict().items())


def test_the_final_fine_tune_is_kept_only_where_it_lowers_the_held_out_loss(tmp_path: Path) -> None:
    """Labels that follow the inputs: fine-tuning helps and the client keeps the tuned model (what a second,
    identical fine-tune gives); random labels: fine-tuning fits noise, the held-out loss rises, the model
    stays as it was."""
    learnable = client_job(tmp_path / "a", True, "strategy.lmc_finetune=3", "train.lr=0.05")
    x = learnable.train_data.x
    learnable = dataclasses.replace(learnable, train_data=TensorData(x, (x.mean((1, 2, 3)) > 0).long(), 10))
    task = learnable.task()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    result = lmc.finetune_if_better(learnable, task)
    assert result["finetune_kept"] == 1.0 and result["finetune_holdout_gain"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in task.model.state_dict().items())
    again = dataclasses.replace(learnable, model=copy.deepcopy(learnable.model))
    again.model.load_state_dict(before)
    assert lmc.finetune_if_better(again, again.task()) == result
    assert_same_state(again.model.state_dict(), task.model.state_dict())

    noise = client_job(tmp_path / "b", True, "strategy.lmc_finetune=3", "train.lr=0.05")
    task = noise.task()
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    result = lmc.finetune_if_better(noise, task)
    assert result["finetune_kept"] == 0.0 and result["finetune_holdout_gain"] <= 0
    assert_same_state(task.model.state_dict(), before)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("strategy", ["strategy.name='fedavg'", "strategy.name='lmc'"])
def test_the_final_fine_tune_needs_the_mixing_criterions_held_out_slice(strategy: str) -> None:
    with pytest.raises(ConfigError, match="^strategy.lmc_finetune: 3 is not allowed; 0 unless"):
        load_config(None, [strategy, "strategy.lmc_finetune=3"])


# --------------------------------------------------------------------------- toy federations


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


class ToyNorm(Toy):
    """The toy with a batch norm on its inputs, the block a feature shift should make personal."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.norm(x))


def toy_federation(
    labels: list[list[int]],
    rounds: int = 6,
    n: int = 400,
    *,
    mix_train: bool = True,
    domains: list[float] | None = None,
    statistics: bool = False,
) -> MixingPolicy:
    """Clients with Gaussian classes (``labels[c]``: client c's classes), run as the mechanism and the
    ClientApp do: each client starts from its own copy with the round's server values mixed in by the
    weights it learns on its held-out slice (``mix_train``; else from the server's shared blocks and its own
    personal ones), trains, reports its weights; the server averages the shared blocks, decides every round
    and averages the personal ones as their reference. ``domains``: client c sees its inputs scaled by
    ``domains[c]`` and shifted by as much (a feature shift), through :class:`ToyNorm`; ``statistics``: the
    weights see running statistics (``lmc_norm = "decide"``)."""
    gen = torch.Generator().manual_seed(0)
    means = 3 * torch.randn(4, 8, generator=gen)
    data = []
    for c, classes in enumerate(labels):
        y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=gen)]
        x = means[y] + torch.randn(n, 8, generator=gen)
        data.append((x * domains[c] + domains[c] if domains else x, y))
    torch.manual_seed(0)
    model = ToyNorm() if domains else Toy()
    blocks = model_blocks(model)
    p = MixingPolicy(blocks, list(blocks), reshare=True, mixing=MixingRule(0.5, 0.1))
    server_state = model.state_dict()
    owns: list[dict[str, torch.Tensor]] = [{} for _ in labels]
    weights: list[dict[str, float]] = [dict.fromkeys(blocks, 1.0) for _ in labels]
    strategy = StrategyConfig(lmc_holdout=0.2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention (200x slower on 2 busy cores)
    try:
        for server_round in range(1, rounds + 1):
            p.record(server_round)
            shared = [k for b in p.shared_blocks() for k in blocks[b]]
            personal = [k for k in server_state if k not in shared]
            server = {k: server_state[k] for k in shared + p.reference_keys(personal)}
            mixable = {b: keys for b, keys in blocks.items() if set(keys) <= server.keys()}
            reports, states = [], []
            for c, (x, y) in enumerate(data):
                model.load_state_dict(owns[c] or server_state)
                model.load_state_dict({k: server_state[k] for k in shared}, strict=False)
                train, held = holdout_split(n, strategy, torch.Generator().manual_seed(c))
                if owns[c]:
                    learned = learn_weights(
                        model, owns[c], server, mixable, {b: weights[c][b] for b in mixable},
                        x[held], y[held], steps=5, lr=1.0, device=CPU, statistics=statistics,
                    )  # fmt: skip
                    weights[c] |= learned
                    if mix_train:
                        model.load_state_dict(mixed_state(owns[c], server, mixable, learned), strict=False)
                model.train()
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
                for _ in range(30):
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(model(x[train]), y[train]).backward()
                    optimizer.step()
                owns[c] = {k: v.clone() for k, v in model.state_dict().items()}
                reports.append({b: weights[c][b] for b in mixable} if server_round > 1 else {})
                states.append(owns[c])
            server_state = {
                k: torch.stack([s[k] for s in states]).double().mean(0).to(v.dtype)
                for k, v in server_state.items()
            }
            p.decide(server_round, reports, [1.0] * len(labels))
    finally:
        torch.set_num_threads(threads)
    return p


@pytest.mark.parametrize("mix_train", [True, False])
def test_identical_clients_keep_high_weights_and_share_everything(mix_train: bool) -> None:
    p = toy_federation([[0, 1, 2, 3]] * 3, mix_train=mix_train)
    assert all(shared == ["body", "head"] for shared in p.history.values())
    assert not p.weights[1] and min(w for weights in p.weights.values() for w in weights.values()) > 0.6


@pytest.mark.parametrize("mix_train", [True, False])
def test_clients_with_disjoint_labels_turn_the_head_personal(mix_train: bool) -> None:
    p = toy_federation([[0, 1], [2, 3]], mix_train=mix_train)
    assert p.shared_blocks() in (["body"], [])
    assert p.weights[max(p.weights)]["head"] < 0.4
    assert "head" not in p.history[max(p.history)]


@pytest.mark.parametrize("statistics", [True, False])
def test_a_feature_shift_turns_the_input_norm_personal_once_its_statistics_are_seen(statistics: bool) -> None:
    """The same classes seen through two domains (inputs as they are / scaled and shifted by 4): the
    server's average of the input norm's running statistics fits neither client. Seen (lmc_norm = "decide")
    the norm's weight falls and it turns personal while body and head stay shared; unseen, it stays
    shared."""
    p = toy_federation([[0, 1, 2, 3]] * 2, domains=[1.0, 4.0], statistics=statistics)
    if statistics:
        assert p.shared_blocks() == ["body", "head"] and p.weights[max(p.weights)]["norm"] < 0.4
    else:
        assert "norm" in p.shared_blocks()


# --------------------------------------------------------------------------- the server's rule


def policy(shared: list[str] | None = None, **kw: object) -> MixingPolicy:
    return MixingPolicy(dict(BLOCKS), shared or list(BLOCKS), norm={"bn1"}, reshare=True, **kw)  # type: ignore[arg-type]


HIGH = {"conv1": 0.9, "conv2": 0.9, "fc1": 0.9, "fc2": 0.9}


def test_hysteresis_turns_a_block_personal_and_shared_again() -> None:
    """Threshold 0.5, margin 0.1: a shared block stays until its mean weight is below 0.4, a personal one
    returns at 0.6; norm blocks follow their owner and report nothing that counts."""
    p = policy(mixing=MixingRule(0.5, 0.1))
    steps = [(0.45, True), (0.35, False), (0.55, False), (0.65, True), (0.41, True)]
    for server_round, (weight, shared) in enumerate(steps, start=1):
        p.decide(server_round, [HIGH | {"fc2": weight, "bn1": 0.0}], [1.0])
        assert ("fc2" in p.shared_blocks()) == shared, server_round
    assert p.shared_blocks() == list(BLOCKS)
    p.decide(6, [HIGH | {"conv1": 0.1}], [1.0])
    assert p.shared_blocks() == ["conv2", "fc1", "fc2"]  # bn1 follows conv1
    assert p.weights[2] == {"conv1": 0.9, "conv2": 0.9, "fc1": 0.9, "fc2": 0.35}


@pytest.mark.parametrize(
    ("norm", "shared"),
    [("follow", ["conv1", "bn1", "fc1", "fc2"]), ("decide", ["conv1", "bn2", "fc1", "fc2"])],
)
def test_norm_blocks_follow_their_owner_or_decide_by_their_own_weight(norm: str, shared: list[str]) -> None:
    """pfllib_cnn with batch norms; conv2 and bn1 weigh low: following, bn1 is shared with conv1 and bn2
    turns personal with conv2; deciding, each goes by its own weight (FedBN's split is reachable)."""
    cfg = load_config(
        None,
        ["strategy.name='lmc'", "strategy.lmc_criterion='mixing'", f"strategy.lmc_norm='{norm}'"],
    )
    model = build_model("pfllib_cnn", 10, 1, 28, norm="batch")
    p = lmc_policy(cfg.strategy, model, resolve(get_algorithm(cfg.strategy).selector(cfg.strategy), model))
    assert isinstance(p, MixingPolicy) and p.shared_blocks() == list(model_blocks(model))
    p.decide(1, [HIGH | {"bn1": 0.1, "conv2": 0.1, "bn2": 0.9}], [1.0])
    assert p.shared_blocks() == shared


def test_weights_are_averaged_by_samples_and_can_end_sharing_nothing_or_everything() -> None:
    p = policy(mixing=MixingRule(0.5, 0.0))
    p.decide(1, [dict.fromkeys(HIGH, 0.2), dict.fromkeys(HIGH, 0.8)], [30.0, 10.0])  # mean 0.35
    assert p.shared_blocks() == [] and p.weights[1]["fc1"] == pytest.approx(0.35)
    p.decide(2, [dict.fromkeys(HIGH, 0.2), dict.fromkeys(HIGH, 0.8)], [10.0, 30.0])  # mean 0.65
    assert p.shared_blocks() == list(BLOCKS)


def test_always_exclude_and_missing_weights() -> None:
    p = policy(mixing=MixingRule(0.5, 0.1), always={"fc2"}, never={"conv1"})
    p.decide(1, [dict.fromkeys(HIGH, 0.0)], [1.0])
    assert p.shared_blocks() == ["fc2"]
    p.decide(2, [{"conv2": 1.0}, {"fc1": 0.3}], [1.0, 1.0])  # each block from the clients that report it
    assert p.shared_blocks() == ["conv2", "fc2"] and p.weights[2] == {"conv2": 1.0, "fc1": 0.3}
    p.decide(3, [{}, {"fc1": 0.7}], [1.0, 1.0])  # nobody reported conv2: it stays as it is
    assert p.shared_blocks() == ["conv2", "fc1", "fc2"]


def test_a_block_personal_from_the_start_has_no_reference_until_a_decision_round_averaged_it() -> None:
    p = policy(["conv1", "bn1", "conv2", "fc1"], mixing=MixingRule(0.5, 0.1))
    assert p.collects(1) and p.reference_keys(["fc2.weight"]) == []
    p.decide(1, [HIGH], [1.0])  # fc2's weight was learned against nothing: it does not decide
    assert "fc2" not in p.shared_blocks() and "fc2" not in p.weights[1]
    assert p.reference_keys(["fc2.weight"]) == ["fc2.weight"]
    p.decide(2, [HIGH], [1.0])
    assert "fc2" in p.shared_blocks()


def test_state_round_trips() -> None:
    p = policy(["conv1", "bn1", "conv2", "fc1"], mixing=MixingRule(0.5, 0.1))
    for server_round, weight in ((1, 0.9), (2, 0.2)):
        p.record(server_round)
        p.decide(server_round, [HIGH | {"conv2": weight}], [1.0])
    again = policy(["conv1", "bn1", "conv2", "fc1"], mixing=MixingRule(0.5, 0.1))
    again.load_state(json.loads(json.dumps(p.state())))  # as a checkpoint stores it
    assert again.state() == p.state()
    assert again.shared_blocks() == p.shared_blocks() == ["conv1", "bn1", "fc1", "fc2"]
    assert again.referenced == p.referenced and again.weights == p.weights


def train_reply(node: int, value: float, n: int, weights: dict[str, float]) -> Message:
    record = MetricRecord(
        {"num-examples": n, "partition-id": node} | {MIX_PREFIX + b: w for b, w in weights.items()}
    )
    state = {key: torch.full((2,), value) for keys in BLOCKS.values() for key in keys}
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": record})
    return Message(content, dst_node_id=node + 1, message_type=MessageType.TRAIN)


class Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_the_mechanism_decides_from_the_clients_mix_metrics_and_collects_every_block() -> None:
    p = policy(mixing=MixingRule(0.5, 0.1))
    strategy = PartialStrategy(FedAvg(min_available_nodes=2), [], sharing=p)
    zeros = ArrayRecord({key: torch.zeros(2) for keys in BLOCKS.values() for key in keys})
    messages = list(strategy.configure_train(1, zeros, ConfigRecord(), Grid()))  # type: ignore[arg-type]
    assert (
        messages[0].content["config"]["lmc-measure"] is True and messages[0].content["config"]["full-model"]
    )
    low = HIGH | {"fc2": 0.1}
    merged, _ = strategy.aggregate_train(1, [train_reply(0, 1.0, 30, low), train_reply(1, 5.0, 10, HIGH)])
    assert merged is not None and p.weights[1]["fc2"] == pytest.approx((0.1 * 30 + 0.9 * 10) / 40)
    assert "fc2" not in p.shared_blocks()
    messages = list(strategy.configure_train(2, merged, ConfigRecord(), Grid()))  # type: ignore[arg-type]
    assert "fc2.weight" not in messages[0].content["arrays"]
    assert list(messages[0].content[REFERENCE].keys()) == ["fc2.weight"]
    np.testing.assert_allclose(messages[0].content[REFERENCE]["fc2.weight"].numpy(), 2.0)  # (1·30 + 5·10)/40


def test_a_client_with_no_weights_yet_does_not_stop_the_aggregation() -> None:
    """Under sampling a decision round can reach a client in its first round: it reports no weights, so the
    replies' metric keys differ (Flower refuses to aggregate those); the decision uses the others alone."""
    p = policy(mixing=MixingRule(0.5, 0.1))
    strategy = PartialStrategy(FedAvg(min_available_nodes=2), [], sharing=p)
    zeros = ArrayRecord({key: torch.zeros(2) for keys in BLOCKS.values() for key in keys})
    list(strategy.configure_train(1, zeros, ConfigRecord(), Grid()))  # type: ignore[arg-type]
    low = HIGH | {"fc2": 0.1}
    merged, metrics = strategy.aggregate_train(1, [train_reply(0, 1.0, 30, low), train_reply(1, 5.0, 10, {})])
    assert merged is not None and p.weights[1]["fc2"] == pytest.approx(0.1)  # client 0's alone
    assert "fc2" not in p.shared_blocks()
    np.testing.assert_allclose(merged["conv1.weight"].numpy(), 2.0)  # both clients averaged: (30 + 50) / 40
    assert metrics is not None and not any(key.startswith(MIX_PREFIX) for key in metrics)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("strategy.lmc_criterion='shadows'", "strategy.lmc_criterion"),
        ("strategy.lmc_holdout=0.7", "strategy.lmc_holdout"),
        ("strategy.lmc_holdout=0", "strategy.lmc_holdout"),
        ("strategy.lmc_weight_threshold=1.5", "strategy.lmc_weight_threshold"),
        ("strategy.lmc_weight_margin=-0.1", "strategy.lmc_weight_margin"),
        ("strategy.lmc_mix_lr=0", "strategy.lmc_mix_lr"),
        ("strategy.lmc_source='server'", "strategy.lmc_source"),
    ],
)
def test_mixing_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(
            None, ["strategy.name='lmc'", "strategy.lmc_criterion='mixing'", "analysis.every=1", override]
        )


# --------------------------------------------------------------------------- a real simulation


def simulated(data_root: Path, out: Path, ray_address: str) -> RunDir:
    overrides = [
        f"data.root='{data_root}'",
        f"federation.ray_address='{ray_address}'",
        "data.min_partition_size=5",
        "federation.clients=3",
        "federation.rounds=3",
        "train.batch_size=16",
        "strategy.name='lmc'",
        "strategy.lmc_criterion='mixing'",
        "strategy.lmc_finetune=1",
    ]
    run = RunDir.create(out)
    simulate(load_config(ROOT / "experiments" / "default.toml", overrides), run)
    return run


@pytest.mark.slow
def test_mixing_runs_in_the_simulation_logs_its_weights_and_is_deterministic(
    tiny_fmnist: Path, tmp_path: Path
) -> None:
    """3 clients x 3 rounds, twice on one Ray cluster: the same weights, shared sets, metrics and model;
    round 1 reports no weight (no own copy yet: nothing decides), later rounds learned weights in [0, 1];
    the clients keep their weights as client state; the last evaluation reports the final fine-tune."""
    with ray_cluster(nodes=1, cpus=os.cpu_count() or 1) as (address, _):
        a, b = (simulated(tiny_fmnist, tmp_path / name, address) for name in "ab")
    history = json.loads(a.file("layers_by_round.json").read_text())
    assert history == json.loads(b.file("layers_by_round.json").read_text())
    assert metrics(a.path) == metrics(b.path)
    assert_same_model(a.file("model.pt"), b.file("model.pt"))
    rounds = history["rounds"]
    assert rounds["1"]["weights"] == {} and rounds["2"]["shared"] == history["blocks"]
    later = [w for r in ("2", "3") for w in rounds[r]["weights"].values()]
    assert all(0.0 <= w <= 1.0 for w in later) and any(w < 1.0 for w in later)
    assert set(rounds["3"]["weights"]) == set(history["blocks"])  # personal blocks are weighed too
    rows = a.read_jsonl()
    assert [r["shared_blocks"] for r in rows] == [rounds[str(r["round"])]["shared"] for r in rows]
    saved = torch.load(sorted(a.file("clients").glob("partition-0/round-*.pt"))[-1], weights_only=True)
    assert {k for k in saved if k.startswith("state.mix.")} == {f"state.mix.{b}" for b in history["blocks"]}
    assert a.file("shared_blocks.png").exists()
    # the final fine-tune: only after the last round, each client keeping (1) or not (0) its tuned model
    assert [("finetune_kept" in r) for r in rows] == [False, False, True]
    assert 0.0 <= rows[-1]["finetune_kept"] <= 1.0 and "finetune_holdout_gain" in rows[-1]
