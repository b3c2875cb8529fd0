"""Faulty client updates are excluded before aggregation; the round goes on with the rest."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedlayer.models import build_model
from fedlayer.run.progress import fault_lines, fault_summary
from fedlayer.run.rundir import RunDir
from fedlayer.server.observers import RoundRecorder
from strategies.mechanism import ClientFault, PartialStrategy, RoundFailedError, RoundObserver

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("cnn", 10, 1, 28).state_dict()


def reply(arrays: dict[str, np.ndarray], partition: int, num_examples: int = 10) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.array(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "partition-id": partition}),
        }
    )
    return Message(content, dst_node_id=partition, message_type=MessageType.TRAIN)


def error_reply(partition: int) -> Message:
    request = Message(RecordDict(), dst_node_id=partition, message_type=MessageType.TRAIN)
    reason = f"<class 'RuntimeError'>:<'partition-id={partition}: RuntimeError: boom'>"
    return Message(Error(code=1, reason=reason), reply_to=request)


def client_updates(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    base = {k: v.numpy() for k, v in model_state().items()}
    return [{k: (v + rng.normal(size=v.shape)).astype(v.dtype) for k, v in base.items()} for _ in range(n)]


def corrupt(update: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    bad = dict(update)
    key = "conv1.weight"
    if kind in ("nan", "inf"):
        bad[key] = update[key].copy()
        bad[key].flat[3] = np.nan if kind == "nan" else -np.inf
    elif kind == "shape":
        bad[key] = np.zeros((*update[key].shape[:-1], 1), dtype=np.float32)
    elif kind == "missing-keys":
        del bad[key]
    elif kind == "extra-keys":
        bad["not.a.layer"] = np.zeros(2, dtype=np.float32)
    return bad


class Faults(RoundObserver):
    def __init__(self) -> None:
        self.seen: list[ClientFault] = []

    def on_client_faults(self, server_round: int, faults: object) -> None:
        self.seen += list(faults)  # type: ignore[call-overload]


def strategy(base: FedAvg, observer: RoundObserver | None = None) -> PartialStrategy:
    state = model_state()
    shared = [k for k in state if not k.startswith("fc2")]  # FedPer-like: the head is personal
    ours = PartialStrategy(base, shared, observers=[observer] if observer else [])
    ours.global_arrays = ArrayRecord(state)
    return ours


@pytest.mark.parametrize("kind", ["error", "nan", "inf", "shape", "missing-keys", "extra-keys"])
def test_faulty_update_is_excluded_and_aggregate_equals_aggregation_without_it(kind: str) -> None:
    updates = client_updates(3)
    replies = [reply(u, i) for i, u in enumerate(updates)]
    replies[1] = error_reply(1) if kind == "error" else reply(corrupt(updates[1], kind), 1)
    observer = Faults()
    merged, _ = strategy(FedAvg(), observer).aggregate_train(1, replies)
    expected, _ = strategy(FedAvg()).aggregate_train(1, [reply(updates[0], 0), reply(updates[2], 2)])
    assert merged is not None and expected is not None
    for key in expected:
        np.testing.assert_array_equal(merged[key].numpy(), expected[key].numpy())
    assert [(f.partition_id, f.reason) for f in observer.seen] == [(1, kind)]


@pytest.mark.parametrize(("loss", "reason"), [(float("nan"), "nan"), (float("inf"), "inf")])
def test_a_diverged_client_is_flagged_even_when_it_sends_no_arrays(loss: float, reason: str) -> None:
    """Under `local` nothing is shared: a NaN training loss in the metrics is still a fault of that round."""
    content = RecordDict(
        {"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": 10, "train_loss": loss})}
    )
    diverged = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    observer = Faults()
    local = PartialStrategy(FedAvg(min_train_nodes=1), [], observers=[observer])
    local.global_arrays = ArrayRecord(model_state())
    local.aggregate_train(1, [reply({}, 0), diverged])
    assert [(f.reason, f.detail) for f in observer.seen] == [(reason, "metric train_loss")]


def test_server_optimizer_state_is_not_touched_by_a_nan_update() -> None:
    """FedAdam's moments would turn NaN for good; with screening they equal a run without the client."""
    updates = client_updates(3)
    ours, clean = strategy(FedAdam()), strategy(FedAdam())
    for s in (ours, clean):
        s.base.current_arrays = {k: v.numpy() for k, v in s._shared(s.global_arrays).items()}
    ours.aggregate_train(
        1, [reply(updates[0], 0), reply(corrupt(updates[1], "nan"), 1), reply(updates[2], 2)]
    )
    clean.aggregate_train(1, [reply(updates[0], 0), reply(updates[2], 2)])
    assert ours.base.m_t is not None and clean.base.m_t is not None
    for key, value in clean.base.m_t.items():
        np.testing.assert_array_equal(ours.base.m_t[key], value)


def test_too_few_valid_updates_end_the_run_with_a_clear_error() -> None:
    updates = client_updates(2)
    replies = [reply(updates[0], 0), reply(corrupt(updates[1], "nan"), 1)]
    with pytest.raises(RoundFailedError, match=r"round 1: 1 valid client updates < .*min_train_clients=2.*"):
        strategy(FedAvg(min_train_nodes=2)).aggregate_train(1, replies)


def test_recorder_counts_faults_by_reason(tmp_path: Path) -> None:
    recorder = RoundRecorder(RunDir(tmp_path))
    recorder.on_train_messages(1, [])
    recorder.on_client_faults(1, [ClientFault(7, 2, "nan", "w"), ClientFault(8, None, "error", "boom")])
    row = recorder.finish_round(1, 0.5, 0.5)
    assert row["client_faults"] == 2 and row["client_failures"] == 1
    assert row["client_fault_reasons"] == {"nan": 1, "error": 1} and row["faulty_partitions"] == [2]
    assert fault_lines(row) == [
        "round 1: partition 2 (node 7) excluded: nan: w",
        "round 1: an unknown partition (node 8) excluded: boom",
    ]


def test_the_fault_summary_names_each_client_once_with_its_first_cause() -> None:
    cause = "partition-id=1: DataError: data-dir: cannot read /d/x.png (cannot identify image file)"
    fault = {"partition": 1, "node": 5, "reason": "error", "detail": cause}
    rows = [{"round": 1, "client_fault_details": [fault]}, {"round": 2}, {"round": 3}]
    rows[2]["client_fault_details"] = [fault | {"detail": "partition-id=1: OSError: later"}]
    assert fault_summary(rows) == (
        "2 of 3 rounds had faults: partition 1 (DataError: data-dir: cannot read /d/x.png (cannot identify "
        "image file))"
    )
    assert fault_summary(rows[1:2]) == ""


def test_replies_are_aggregated_in_partition_order() -> None:
    """Float sums must not depend on which client finished first (determinism)."""
    updates = client_updates(4)
    forward = strategy(FedAvg()).aggregate_train(1, [reply(u, i, 10 + i) for i, u in enumerate(updates)])[0]
    backward = [reply(u, i, 10 + i) for i, u in reversed(list(enumerate(updates)))]
    reverse = strategy(FedAvg()).aggregate_train(1, backward)[0]
    assert forward is not None and reverse is not None
    for key in forward:
        assert forward[key].numpy().tobytes() == reverse[key].numpy().tobytes()


class Nodes:
    """What client sampling asks of a Grid: the connected node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def train_round(ours: PartialStrategy, server_round: int, answer: Callable[[Message], Message]) -> None:
    """configure_train -> the Grid sends (setting message ids) -> each instruction answered -> aggregate."""
    grid = cast(Grid, Nodes([101, 102, 103]))
    instructions = list(ours.configure_train(server_round, ours.global_arrays, ConfigRecord(), grid))
    for instruction in instructions:
        instruction.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do on push
    ours.aggregate_train(server_round, [answer(instruction) for instruction in instructions])


def test_a_supernode_that_died_is_attributed_to_its_partition() -> None:
    """The SuperLink answers for a node that is gone (the reply's source is the SuperLink, not the node);
    the fault names the partition that node reported in an earlier round."""
    partitions = {101: 0, 102: 1, 103: 2}
    updates = dict(zip(partitions, client_updates(3), strict=True))
    observer = Faults()
    ours = strategy(FedAvg(min_train_nodes=2), observer)

    def healthy(instruction: Message) -> Message:
        node = instruction.metadata.dst_node_id
        content = reply(updates[node], partitions[node]).content
        return Message(content, reply_to=instruction)

    def node_103_died(instruction: Message) -> Message:
        if instruction.metadata.dst_node_id != 103:
            return healthy(instruction)
        return create_message_error_unavailable_res_message(instruction.metadata, "node_unavail")

    train_round(ours, 1, healthy)
    train_round(ours, 2, node_103_died)
    (fault,) = observer.seen
    assert (fault.node_id, fault.partition_id, fault.reason) == (103, 2, "error")


@pytest.mark.slow
def test_faulty_clients_in_a_real_simulation(tiny_fmnist: Path, tmp_path: Path) -> None:
    """Round 1: partition 0 raises; round 2: partition 1 sends NaN; round 3: 2 faults < minimum: exit 1."""
    out = tmp_path / "run"
    sets = [
        f"data.root='{tiny_fmnist}'",
        "data.min_partition_size=5",
        "federation.clients=3",
        "federation.rounds=3",
        "train.batch_size=16",
        "federation.min_train_clients=2",
        "federation.client_app='tests.fault_injection:app'",
    ]
    args = [sys.executable, "-m", "fedlayer.cli", "run", "experiments/default.toml", "--out", str(out)]
    env = os.environ | {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FEDLAYER_TEST_FAULT": "raise:0:1,nan:1:2,shape:0:3,extra:2:3",
    }
    proc = subprocess.run(
        args + [a for s in sets for a in ("--set", s)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert "\x1b[" not in proc.stderr, "no colour codes when stderr is not a terminal"
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("fedlayer: warning: ")]
    assert len(warnings) == 2, proc.stderr[-3000:]  # one per fault, the round it happens
    excluded = "fedlayer: warning: round {}: partition {} \\(node \\d+\\) excluded: {}"
    assert re.fullmatch(excluded.format(1, 0, "FEDLAYER_TEST_FAULT: injected failure"), warnings[0]), warnings
    assert re.fullmatch(excluded.format(2, 1, "nan: conv1.weight"), warnings[1]), warnings
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedlayer: error: round 3: 1 valid client updates")
    assert "partition-id=0 shape (" in last and "partition-id=2 extra-keys (injected.extra)" in last
    assert last.endswith(f"the last complete round is saved, continue with: fedlayer run --resume {out}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["client_fault_reasons"] == {"error": 1} and rows[0]["faulty_partitions"] == [0]
    assert rows[1]["client_fault_reasons"] == {"nan": 1} and rows[1]["faulty_partitions"] == [1]
    assert [r["clients_trained"] for r in rows] == [2, 2]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["arrays"].values() if t.is_floating_point())
    log = (out / "flower.log").read_text()
    assert "client partition-id=1 excluded (nan: conv1.weight)" in log
    assert "client partition-id=0 excluded (error:" in log
