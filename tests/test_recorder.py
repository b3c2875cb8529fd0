"""The per-round metrics row: client statistics as PFLlib and fedlayer report them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlayer.config import load_config
from fedlayer.models import build_model, extend
from fedlayer.run.rundir import RunDir
from fedlayer.server.app import global_is_pooled_personalized, shared_layers
from fedlayer.server.observers import RoundRecorder, pooled_evaluation
from strategies import get_algorithm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def evaluate_reply(partition: int, acc: float, n: int) -> Message:
    metrics = {"num-examples": n, "partition-id": partition, "personalized_acc": acc, "personalized_loss": 0}
    content = RecordDict({"metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
    return Message(content, dst_node_id=partition + 1, message_type=MessageType.EVALUATE)


def test_pooled_personalized_accuracy_weighs_clients_by_their_test_samples(tmp_path: Path) -> None:
    """A small client at 0.5 and a big one at 1.0: the client mean is 0.75, Σ correct / Σ samples is ~0.99."""
    recorder = RoundRecorder(RunDir(tmp_path))
    recorder.on_evaluate_replies(1, [evaluate_reply(0, 0.5, 10), evaluate_reply(1, 1.0, 990)])
    assert recorder.row["personalized_acc"] == pytest.approx(0.75)
    assert recorder.row["personalized_acc_pooled"] == pytest.approx((5 + 990) / 1000)


def test_pooled_evaluation_weighs_losses_by_samples_and_counts_whole_correct_predictions() -> None:
    """Two clients, 3 and 7 test samples: 2/3 and 3/7 correct (not exact in floating point)."""
    pooled = pooled_evaluation(
        [
            {"num-examples": 3, "personalized_acc": 2 / 3, "personalized_loss": 0.9},
            {"num-examples": 7, "personalized_acc": 3 / 7, "personalized_loss": 0.4},
        ]
    )
    assert pooled is not None
    assert pooled.samples == 10
    assert pooled.acc == 0.5  # (2 + 3) / 10, exactly
    assert pooled.loss == pytest.approx((3 * 0.9 + 7 * 0.4) / 10, rel=1e-12)
    assert pooled_evaluation([]) is None


@pytest.mark.parametrize(
    ("overrides", "derived"),
    [
        (["strategy.name='fedavg'"], True),
        (["strategy.name='fedprox'"], True),
        (["strategy.name='fedavg'", "model.norm='batch'"], True),  # FedAvg averages the statistics too
        (["strategy.name='fedavg'", "data.pool='train'"], False),  # the server's own test set
        (["strategy.name='fedavg'", "data.max_test_samples=100"], False),  # a sub-sample of the union
        (["strategy.name='fedavg'", "data.label_shift='permute'"], False),  # clients see other labels
        (["strategy.name='fedper'"], False),  # personal head
        (["strategy.name='fedbn'", "model.norm='batch'"], False),
        (["strategy.name='ditto'"], False),  # a personal model is evaluated
        (["strategy.name='fedrod'"], False),  # an extension
        (["strategy.name='fedcac'"], False),  # a model per client
        (["strategy.name='lmc'"], False),  # the shared set changes
        (["strategy.name='partial'", "strategy.shared=['conv1']"], False),
    ],
)
def test_global_metrics_come_from_the_clients_only_where_they_evaluate_the_same(
    overrides: list[str], derived: bool
) -> None:
    cfg = load_config(ROOT / "experiments" / "pfllib_fmnist.toml", overrides)
    algorithm = get_algorithm(cfg.strategy)
    torch.manual_seed(0)
    model = extend(build_model(cfg.model.name, 10, 1, 28, cfg.model.norm), algorithm.extension, cfg.strategy)
    assert global_is_pooled_personalized(cfg, shared_layers(cfg, model)) is derived
