"""Partial aggregation: the mechanism against Flower's own strategies, algorithms, client recipes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian
from flwr.supercore.task_identity import TaskIdentity

from fedlayer.client.recipes import PERSONALIZATIONS, RECIPES, LocalTask, personalize
from fedlayer.config import ConfigError, StrategyConfig, TrainConfig
from fedlayer.layers import resolve
from fedlayer.models import build_model, model_blocks, model_groups
from strategies import ALGORITHMS, PartialStrategy, get_algorithm, merge_into, restrict_content


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages are stamped with the running task's ids; outside a ServerApp we set them."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", 10, 1, 28)


def reply(state: dict[str, torch.Tensor], num_examples: int, node: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v.detach().clone() for k, v in state.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "partition-id": node}),
        }
    )
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def client_states(n: int, model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {
            k: v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()
        }
        for _ in range(n)
    ]


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def shared_keys_of(name: str, model: torch.nn.Module, **strategy: object) -> list[str]:
    cfg = StrategyConfig(name=name, **strategy)  # type: ignore[arg-type]
    return resolve(get_algorithm(cfg).selector(cfg), model).shared_keys


@pytest.mark.parametrize("base_cls", [FedAvg, FedMedian])
def test_everything_shared_equals_flower_strategy_exactly(base_cls: type[FedAvg]) -> None:
    model = cnn()
    states = client_states(3, model)
    weights = [10, 30, 60]
    global_arrays = ArrayRecord(model.state_dict())
    ours = PartialStrategy(base_cls(), list(model.state_dict()))
    ours.global_arrays = global_arrays
    theirs, _ = base_cls().aggregate_train(
        1, [reply(s, w, i) for i, (s, w) in enumerate(zip(states, weights, strict=True))]
    )
    replies = [reply(s, w, i) for i, (s, w) in enumerate(zip(states, weights, strict=True))]
    mine, _ = ours.aggregate_train(1, replies)
    assert theirs is not None and mine is not None
    expected, got = as_numpy(theirs), as_numpy(mine)
    assert list(got) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_personal_keys_are_dropped_and_keep_the_server_value() -> None:
    model = cnn()
    shared = shared_keys_of("fedper", model)
    assert "fc2.weight" not in shared and "conv1.weight" in shared
    states = client_states(2, model)
    strategy = PartialStrategy(FedAvg(), shared)
    strategy.global_arrays = ArrayRecord(model.state_dict())
    # Analysis rounds send full models back: the personal head must still not be aggregated.
    merged, _ = strategy.aggregate_train(1, [reply(s, 1, i) for i, s in enumerate(states)])
    assert merged is not None
    np.testing.assert_array_equal(merged["fc2.weight"].numpy(), model.state_dict()["fc2.weight"].numpy())
    mean_conv = (states[0]["conv1.weight"] + states[1]["conv1.weight"]).numpy() / 2
    np.testing.assert_allclose(merged["conv1.weight"].numpy(), mean_conv, rtol=1e-6)


def test_restrict_content_keeps_only_shared_keys() -> None:
    model = cnn()
    msg = reply(model.state_dict(), 5, 0)
    restricted = restrict_content(msg.content, ["conv1.weight"])
    assert list(restricted["arrays"].keys()) == ["conv1.weight"]  # type: ignore[union-attr]
    assert restricted["metrics"]["num-examples"] == 5  # type: ignore[index]


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_only_shared_keys_are_sent_and_full_models_requested_on_analysis_rounds() -> None:
    model = cnn()
    shared = shared_keys_of("lgfedavg", model)
    strategy = PartialStrategy(FedAvg(), shared, full_model_rounds=lambda r: r % 2 == 0)
    arrays = ArrayRecord(model.state_dict())
    for server_round, full in ((1, False), (2, True)):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), FakeGrid([1, 2])))  # type: ignore[arg-type]
        assert len(messages) == 2
        for msg in messages:
            assert list(msg.content["arrays"].keys()) == ["fc2.weight", "fc2.bias"]  # type: ignore[union-attr]
            assert msg.content["config"]["full-model"] is full  # type: ignore[index]


def test_fedbn_keeps_every_batchnorm_local_including_downsample() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, 32, norm="batch")
    shared = set(shared_keys_of("fedbn", model))
    bn_keys = {k for k in model.state_dict() if any(part.startswith("bn") for part in k.split("."))}
    downsample_bn = {k for k in model.state_dict() if ".downsample.1." in k}
    assert downsample_bn and "layer2.0.downsample.1.running_mean" in downsample_bn
    assert not (bn_keys | downsample_bn) & shared
    assert "layer2.0.downsample.0.weight" in shared and "fc.weight" in shared


def test_integer_buffers_stay_integer_after_aggregation() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, 32, norm="batch")
    states = client_states(2, model)
    states[0]["bn1.num_batches_tracked"] = torch.tensor(3)
    states[1]["bn1.num_batches_tracked"] = torch.tensor(5)
    strategy = PartialStrategy(FedAvg(), list(model.state_dict()))
    strategy.global_arrays = ArrayRecord(model.state_dict())
    merged, _ = strategy.aggregate_train(1, [reply(s, 1, i) for i, s in enumerate(states)])
    assert merged is not None
    value = merged["bn1.num_batches_tracked"].numpy()
    assert value.dtype == np.int64 and int(value) == 4


@pytest.mark.parametrize("base_cls", [FedAvgM, FedAdam])
def test_server_optimizers_work_on_the_shared_subset(base_cls: type[FedAvg]) -> None:
    model = cnn()
    shared = shared_keys_of("fedper", model)
    strategy = PartialStrategy(base_cls(), shared)
    arrays = ArrayRecord(model.state_dict())
    list(strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid([1, 2])))  # type: ignore[arg-type]
    merged, _ = strategy.aggregate_train(1, [reply(s, 1, i) for i, s in enumerate(client_states(2, model))])
    assert merged is not None and list(merged.keys()) == list(model.state_dict())
    assert not np.array_equal(merged["conv1.weight"].numpy(), arrays["conv1.weight"].numpy())
    np.testing.assert_array_equal(merged["fc2.bias"].numpy(), arrays["fc2.bias"].numpy())


def test_local_shares_nothing_and_keeps_the_global_model() -> None:
    model = cnn()
    assert shared_keys_of("local", model) == []
    strategy = PartialStrategy(FedAvg(), [])
    arrays = ArrayRecord(model.state_dict())
    strategy.global_arrays = arrays
    merged, metrics = strategy.aggregate_train(1, [reply({}, 3, i) for i in range(2)])
    assert merged is arrays
    assert metrics is not None


def test_partial_uses_the_configured_patterns_and_rejects_bad_ones() -> None:
    model = cnn()
    assert shared_keys_of("partial", model, shared=["conv*"]) == [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
    ]
    with pytest.raises(ConfigError, match="strategy.shared"):
        get_algorithm(StrategyConfig(name="partial"))
    with pytest.raises(ConfigError, match="strategy.shared"):
        get_algorithm(StrategyConfig(name="fedper", shared=["conv*"]))
    with pytest.raises(ValueError, match="strategy.shared: pattern 'clasifier.\\*' matches no block"):
        shared_keys_of("partial", model, shared=["clasifier.*"])


def test_every_algorithm_names_a_recipe_and_a_personalization() -> None:
    assert all(algorithm.recipe in RECIPES for algorithm in ALGORITHMS.values())
    assert all(algorithm.personalization in PERSONALIZATIONS for algorithm in ALGORITHMS.values())


def local_task(model: torch.nn.Module, **strategy: object) -> LocalTask:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    blocks, groups = model_blocks(model), model_groups(model)
    head = {k for b in groups["head"] for k in blocks[b]}
    params = {n for n, _ in model.named_parameters()}
    return LocalTask(
        model,
        x,
        y,
        TrainConfig(lr=0.1, batch_size=16),
        StrategyConfig(**strategy),  # type: ignore[arg-type]
        torch.device("cpu"),
        gen,
        head,
        params - head,
    )


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


def test_fedbabu_trains_only_the_body_and_fine_tunes_a_copy_of_the_head() -> None:
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = local_task(model, name="fedbabu", finetune_steps=3)
    RECIPES["fedbabu"](task)
    assert changed(before, model) == {
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "fc1.weight",
        "fc1.bias",
    }
    after_training = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = personalize(ALGORITHMS["fedbabu"], task)
    assert changed(after_training, tuned) == {"fc2.weight", "fc2.bias"}
    assert not changed(after_training, model)


def test_fedbabu_final_protocol_tunes_the_whole_model_after_the_last_round_only() -> None:
    """PFLlib's FedBABU: no fine-tuning during rounds; the whole model (on a copy) after the last round."""
    model = cnn()
    task = local_task(model, name="fedbabu", finetune="final", finetune_epochs=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert personalize(ALGORITHMS["fedbabu"], task, last_round=False) is model
    tuned = personalize(ALGORITHMS["fedbabu"], task, last_round=True)
    assert changed(before, tuned) == set(before)
    assert not changed(before, model)


def test_fedrep_trains_head_then_body() -> None:
    model = cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    RECIPES["fedrep"](local_task(model, name="fedrep"))
    assert changed(before, model) == set(before)  # both phases ran


def test_fedprox_term_pulls_towards_the_received_model() -> None:
    drift = {}
    for mu in (0.0, 10.0):
        model = cnn()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        RECIPES["fedprox"](local_task(model, name="fedprox", proximal_mu=mu))
        drift[mu] = sum((model.state_dict()[k] - before[k]).norm() ** 2 for k in before).sqrt().item()
    assert drift[10.0] < 0.7 * drift[0.0]


def test_merge_into_rejects_nothing_and_keeps_order() -> None:
    model = cnn()
    full = ArrayRecord(model.state_dict())
    part = ArrayRecord({"fc2.bias": torch.ones(10)})
    merged = merge_into(full, part)
    assert list(merged.keys()) == list(full.keys())
    np.testing.assert_array_equal(merged["fc2.bias"].numpy(), np.ones(10, dtype=np.float32))


def test_drop_last_skips_the_partial_batch() -> None:
    from fedlayer.training import _batches

    x, y = torch.zeros(25, 1), torch.zeros(25, dtype=torch.long)
    assert [len(b) for b, _ in _batches(x, y, 10, None)] == [10, 10, 5]
    assert [len(b) for b, _ in _batches(x, y, 10, None, drop_last=True)] == [10, 10]
