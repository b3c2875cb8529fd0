"""Barrier-guided sharing (`lmc`): the decision rule, the block-switching rules and the clients' costs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from sim_helpers import cli_args, metrics, run

from fedlayer.analysis.evaluate import EvalData, Evaluator
from fedlayer.analysis.sharing import sharing_costs
from fedlayer.config import ConfigError, load_config
from fedlayer.contract import COST_PREFIX, REFERENCE
from fedlayer.models import build_model, model_blocks
from strategies.lmc import LmcPolicy, LmcRule
from strategies.mechanism import PartialStrategy

BLOCKS = {name: [f"{name}.weight"] for name in ("conv1", "bn1", "conv2", "fc1", "fc2")}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def policy(shared: list[str] | None = None, **kw: object) -> LmcPolicy:
    return LmcPolicy(dict(BLOCKS), shared or list(BLOCKS), norm={"bn1"}, **kw)  # type: ignore[arg-type]


COSTS = {"conv1": 0.01, "conv2": 0.2, "fc1": 0.04, "fc2": 1.5}


def test_threshold_shares_the_cheap_blocks_and_norm_layers_follow_their_block() -> None:
    p = policy(rule=LmcRule(threshold=0.05))
    assert p.shared_blocks() == list(BLOCKS)  # until the first measurement: strategy.shared (everything)
    p.decide(1, [COSTS], [1.0])
    assert p.shared_blocks() == ["conv1", "bn1", "fc1"]  # bn1 follows conv1; its own cost is not asked
    p.decide(2, [COSTS | {"conv1": 0.3}], [1.0])
    assert p.shared_blocks() == ["fc1"]


def test_fraction_shares_the_cheapest_blocks() -> None:
    p = policy(rule=LmcRule(fraction=0.5))
    p.decide(1, [COSTS], [1.0])
    assert p.shared_blocks() == ["conv1", "bn1", "fc1"]  # ceil(0.5 x 4 deciding blocks) = 2 cheapest
    p = policy(rule=LmcRule(fraction=1.0))
    p.decide(1, [COSTS], [1.0])
    assert p.shared_blocks() == list(BLOCKS)


def test_always_and_exclude_override_the_measurement() -> None:
    p = policy(rule=LmcRule(threshold=0.05), always={"fc2"}, never={"conv1"})
    assert "conv1" not in p.shared_blocks() and "bn1" not in p.shared_blocks()  # excluded before any decision
    p.decide(1, [COSTS], [1.0])
    assert p.shared_blocks() == ["fc1", "fc2"]
    assert set(p.deciding()) == {"conv2", "fc1"}


def test_a_block_personal_from_the_start_is_decided_only_once_it_has_a_reference() -> None:
    """Round 1's reference of a never-shared block is just its initial value: its cost is not used."""
    p = policy(["conv1", "bn1", "conv2", "fc1"], rule=LmcRule(threshold=0.05), reshare=True)
    p.decide(1, [COSTS | {"fc2": 0.0}], [1.0])
    assert "fc2" not in p.shared_blocks() and set(p.costs[1]) == {"conv1", "conv2", "fc1"}
    p.decide(2, [COSTS | {"fc2": 0.0}], [1.0])  # now averaged once: measured against the clients' average
    assert "fc2" in p.shared_blocks()


def test_a_block_that_turned_personal_stays_personal_unless_reshare() -> None:
    """Default: only shared blocks are measured and decide; with reshare a cheap personal block returns."""
    for reshare, after in ((False, ["conv1", "bn1", "fc1"]), (True, list(BLOCKS))):
        p = policy(rule=LmcRule(threshold=0.05), reshare=reshare)
        p.decide(1, [COSTS], [1.0])
        assert p.shared_blocks() == ["conv1", "bn1", "fc1"]
        p.decide(2, [dict.fromkeys(COSTS, 0.0)], [1.0])
        assert p.shared_blocks() == after
        assert set(p.costs[2]) == ({"conv1", "conv2", "fc1", "fc2"} if reshare else {"conv1", "fc1"})


def test_a_fraction_counts_every_deciding_block_when_blocks_only_turn_personal() -> None:
    p = policy(rule=LmcRule(fraction=0.5))
    p.decide(1, [COSTS], [1.0])
    p.decide(2, [COSTS | {"conv1": 0.9}], [1.0])  # ceil(0.5 x 4) = 2: both shared blocks stay
    assert p.shared_blocks() == ["conv1", "bn1", "fc1"]
    p = policy(rule=LmcRule(fraction=0.25))
    p.decide(1, [COSTS], [1.0])
    assert p.shared_blocks() == ["conv1", "bn1"]


def test_statistic_over_clients() -> None:
    clients = [COSTS, COSTS | {"conv1": 0.5}, COSTS | {"conv1": 0.02}]
    weights = [10.0, 1.0, 10.0]
    assert LmcRule(statistic="mean").aggregate([0.01, 0.5, 0.02], weights) == pytest.approx(
        0.3 / 21 + 0.5 / 21
    )
    mean, worst = policy(rule=LmcRule(0.05)), policy(rule=LmcRule(0.05, statistic="max"))
    mean.decide(1, clients, weights)
    worst.decide(1, clients, weights)
    assert "conv1" in mean.shared_blocks() and "conv1" not in worst.shared_blocks()
    q = LmcRule(statistic="quantile", quantile=0.5)
    assert q.aggregate([0.01, 0.5, 0.02], weights) == pytest.approx(0.02)


def test_missing_costs_keep_the_current_set_and_state_round_trips() -> None:
    p = policy(rule=LmcRule(threshold=0.05))
    p.decide(1, [{"conv1": 0.0}], [1.0])  # incomplete: no decision
    assert p.shared_blocks() == list(BLOCKS)
    p.record(1)
    p.decide(1, [COSTS], [1.0])
    p.record(2)
    again = policy(rule=LmcRule(threshold=0.05))
    again.load_state(p.state())
    assert again.shared_blocks() == p.shared_blocks() and again.history == p.history


# --------------------------------------------------------------------------- the mechanism


def state(value: float) -> dict[str, torch.Tensor]:
    return {key: torch.full((2,), value) for keys in BLOCKS.values() for key in keys}


def train_reply(node: int, value: float, n: int, costs: dict[str, float]) -> Message:
    metrics = MetricRecord(
        {"num-examples": n, "partition-id": node} | {COST_PREFIX + b: c for b, c in costs.items()}
    )
    content = RecordDict({"arrays": ArrayRecord(state(value)), "metrics": metrics})
    return Message(content, dst_node_id=node + 1, message_type=MessageType.TRAIN)


class Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def test_block_switching_personal_takes_the_average_shared_keeps_the_aggregate() -> None:
    """Round 1 measures: fc2 turns personal (its server value becomes the clients' weighted average, the
    reference of the next measurement), conv2 stays shared (base aggregate); round 2 sends the personal
    blocks' reference with the measurement request and only shared keys as the model."""
    p = policy(["conv1", "bn1", "conv2", "fc1"], rule=LmcRule(threshold=0.05), reshare=True)
    strategy = PartialStrategy(FedAvg(min_available_nodes=2), [], sharing=p)
    messages = list(strategy.configure_train(1, ArrayRecord(state(0.0)), ConfigRecord(), Grid()))  # type: ignore[arg-type]
    content = messages[0].content
    assert content["config"]["lmc-measure"] is True and content["config"]["full-model"] is True
    assert sorted(content[REFERENCE].keys()) == ["fc2.weight"]  # what the personal block is measured against
    assert "fc2.weight" not in content["arrays"]
    costs = {"conv1": 0.0, "conv2": 0.01, "fc1": 0.0, "fc2": 2.0}
    merged, _ = strategy.aggregate_train(1, [train_reply(0, 1.0, 30, costs), train_reply(1, 4.0, 10, costs)])
    assert merged is not None
    average = (1.0 * 30 + 4.0 * 10) / 40
    np.testing.assert_allclose(merged["conv2.weight"].numpy(), average)  # shared: FedAvg's aggregate
    np.testing.assert_allclose(merged["fc2.weight"].numpy(), average)  # personal: the reference for next time
    assert p.shared_blocks() == ["conv1", "bn1", "conv2", "fc1"]
    p.decide(1, [costs | {"conv2": 0.5}], [1.0])  # conv2 turns personal from round 2 on
    messages = list(strategy.configure_train(2, merged, ConfigRecord(), Grid()))  # type: ignore[arg-type]
    assert sorted(messages[0].content["arrays"].keys()) == ["bn1.weight", "conv1.weight", "fc1.weight"]
    assert sorted(messages[0].content[REFERENCE].keys()) == ["conv2.weight", "fc2.weight"]
    assert p.history == {1: ["conv1", "bn1", "conv2", "fc1"], 2: ["conv1", "bn1", "fc1"]}


def test_a_block_turning_shared_starts_from_the_clients_average() -> None:
    """fc2 was personal; round 1 averages it (the reference), round 2's measurement makes it shared:
    round 3 sends the clients' weighted average of round 2."""
    p = policy(["conv1", "bn1", "conv2", "fc1"], rule=LmcRule(threshold=0.05), reshare=True)
    strategy = PartialStrategy(FedAvg(min_available_nodes=2), [], sharing=p)
    cheap = dict.fromkeys(COSTS, 0.0)
    arrays = ArrayRecord(state(0.0))
    for server_round, (a, b) in ((1, (1.0, 1.0)), (2, (2.0, 6.0))):
        strategy.configure_train(server_round, arrays, ConfigRecord(), Grid())  # type: ignore[arg-type]
        replies = [train_reply(0, a, 10, cheap), train_reply(1, b, 30, cheap)]
        merged, _ = strategy.aggregate_train(server_round, replies)
        assert merged is not None
        arrays = merged
        assert ("fc2" in p.shared_blocks()) == (server_round == 2)
    messages = list(strategy.configure_train(3, arrays, ConfigRecord(), Grid()))  # type: ignore[arg-type]
    np.testing.assert_allclose(
        messages[0].content["arrays"]["fc2.weight"].numpy(), (2.0 * 10 + 6.0 * 30) / 40
    )


def test_without_reshare_decision_rounds_move_no_full_models_and_no_reference() -> None:
    p = policy(["conv1", "bn1", "conv2", "fc1"], rule=LmcRule(threshold=0.05))
    strategy = PartialStrategy(FedAvg(min_available_nodes=2), [], sharing=p)
    arrays = ArrayRecord(state(0.0))
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), Grid()))  # type: ignore[arg-type]
    content = messages[0].content
    assert content["config"]["lmc-measure"] is True and content["config"]["full-model"] is False
    assert REFERENCE not in content.array_records and "fc2.weight" not in content["arrays"]
    costs = {"conv1": 0.0, "conv2": 0.5, "fc1": 0.0}
    replies = [train_reply(0, 1.0, 30, costs), train_reply(1, 4.0, 10, costs)]
    for reply in replies:  # what a client sends when no full model is asked: the shared keys
        reply.content = RecordDict(
            {
                "arrays": ArrayRecord({k: v for k, v in state(1.0).items() if k != "fc2.weight"}),
                "metrics": reply.content["metrics"],
            }
        )
    merged, _ = strategy.aggregate_train(1, replies)
    assert merged is not None
    np.testing.assert_allclose(merged["fc2.weight"].numpy(), 0.0)  # personal: the server's value untouched
    assert p.shared_blocks() == ["conv1", "bn1", "fc1"]


# --------------------------------------------------------------------------- the clients' costs


def test_sharing_costs_are_midpoint_layer_barriers_against_the_own_endpoint() -> None:
    torch.manual_seed(0)
    model, other = build_model("cnn", 10, 1, 28), build_model("cnn", 10, 1, 28)
    gen = torch.Generator().manual_seed(1)
    data = EvalData(torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    blocks = model_blocks(model)
    reference = other.state_dict() | {k: v for k, v in model.state_dict().items() if k.startswith("fc1.")}
    costs = sharing_costs(model, reference, blocks, data, device=torch.device("cpu"))
    assert list(costs) == list(blocks)
    assert costs["fc1"] == 0.0  # the block equals the reference: nothing moves
    evaluator = Evaluator(model, data, exact=True)
    own = model.state_dict()
    mid = own | {k: (own[k] + reference[k]) / 2 for k in blocks["conv2"]}
    (loss_own, _), (loss_mid, _) = evaluator.evaluate_many([own, mid])
    assert costs["conv2"] == pytest.approx(loss_mid - loss_own, abs=1e-6)
    assert all(c == 0.0 for c in sharing_costs(model, own, blocks, data, device=torch.device("cpu")).values())


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("strategy.lmc_source='server'", "strategy.lmc_source"),
        ("strategy.lmc_threshold=-0.1", "strategy.lmc_threshold"),
        ("strategy.lmc_share_fraction=1.5", "strategy.lmc_share_fraction"),
        ("strategy.lmc_share_fraction=-0.5", "strategy.lmc_share_fraction"),
        ("strategy.lmc_statistic='median'", "strategy.lmc_statistic"),
        ("strategy.lmc_every=0", "strategy.lmc_every"),
    ],
)
def test_lmc_config_errors_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(None, ["strategy.name='lmc'", override])


def test_lmc_server_source_needs_the_analysis_in_its_decision_rounds() -> None:
    ok = load_config(None, ["strategy.name='lmc'", "strategy.lmc_source='server'", "analysis.every=1"])
    assert ok.strategy.lmc_source == "server"
    with pytest.raises(ConfigError, match="^strategy.lmc_source: "):
        load_config(None, ["strategy.name='lmc'", "strategy.lmc_source='server'", "analysis.every=2"])


# --------------------------------------------------------------------------- a real simulation

LMC_RUN = (
    "data.partitioner='iid'",
    "data.label_shift='permute'",  # concept shift: some block must stay client-specific
    "federation.fraction_train=1.0",
    "federation.rounds=4",
    "strategy.name='lmc'",
    "strategy.lmc_every=2",
    "strategy.lmc_share_fraction=0.75",  # 3 of the CNN's 4 blocks shared: the most expensive stays personal
)


@pytest.mark.slow
def test_lmc_keeps_the_expensive_block_personal_deterministically(tiny_fmnist: Path, tmp_path: Path) -> None:
    """Permuted labels per client: the block with the highest measured cost turns personal in the decision
    round and stays so; rounds that measure nothing send no personal key up; the same seed twice gives the
    same shared-set history and metrics."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        run(cli_args(tiny_fmnist, out, *LMC_RUN))
    history = json.loads((runs[0] / "layers_by_round.json").read_text())
    assert history == json.loads((runs[1] / "layers_by_round.json").read_text())
    assert metrics(runs[0]) == metrics(runs[1])
    rounds = history["rounds"]
    assert set(rounds) == {"1", "2", "3", "4"} and set(rounds["2"]["costs"]) == {
        "conv1",
        "conv2",
        "fc1",
        "fc2",
    }
    assert not rounds["1"]["costs"] and not rounds["3"]["costs"]  # lmc_every = 2
    costs = rounds["2"]["costs"]
    expensive = max(costs, key=costs.__getitem__)
    assert rounds["3"]["shared"] == [b for b in history["blocks"] if b != expensive]
    assert set(rounds["4"]["costs"]) == set(costs) - {expensive}  # a personal block is no longer measured
    rows = metrics(runs[0])
    assert [r["shared_blocks"] for r in rows] == [rounds[str(r["round"])]["shared"] for r in rows]
    assert rows[2]["shared_fraction"] == 0.75
    model = torch.load(runs[0] / "initial_model.pt", weights_only=True)
    shared = ArrayRecord({key: value for key, value in model.items() if not key.startswith(f"{expensive}.")})
    assert rows[0]["bytes_up"] == 4 * ArrayRecord(model).count_bytes()  # round 1: everything shared
    assert rows[2]["bytes_up"] == 4 * shared.count_bytes()  # round 3: the personal block stays on clients
    assert (runs[0] / "shared_blocks.png").exists()
