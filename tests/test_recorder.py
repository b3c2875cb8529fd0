"""The per-round metrics row: client statistics as PFLlib and fedlayer report them."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlayer.run.rundir import RunDir
from fedlayer.server.observers import RoundRecorder


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
