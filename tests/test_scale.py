"""Many clients: no message per node before round 1, clients without data left out, personal state on disk."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_fmnist
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import InMemoryGrid

from fedlayer.client.store import PersonalStore
from fedlayer.config import Config, load_config
from fedlayer.data import ClientSplit, DataError, TensorData
from fedlayer.experiment import FederatedData
from fedlayer.models import build_model
from fedlayer.run.rundir import RunDir
from fedlayer.server.app import shared_layers
from fedlayer.server.nodes import excluded_partitions
from strategies import PartialStrategy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def fed_data(sizes: list[int]) -> FederatedData:
    """Clients holding ``sizes`` samples each (a fifth of them, at least one, held out for testing)."""
    splits, start = [], 0
    for pid, n in enumerate(sizes):
        n_test = 0 if n < 2 else max(1, n // 5)
        idx = np.arange(start, start + n)
        splits.append(ClientSplit(pid, idx[n_test:], idx[:n_test]))
        start += n
    data = TensorData(torch.zeros(start, 1, 1, 1), torch.zeros(start, dtype=torch.long), 10)
    return FederatedData(data, data, splits)


def test_clients_without_data_are_never_sampled() -> None:
    cfg = Config()
    cfg.federation.clients = 6
    assert excluded_partitions(cfg, fed_data([20, 0, 30, 1, 25, 40])) == [1, 3]
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model("mlp", 10, 1, 28).state_dict())
    strategy = PartialStrategy(FedAvg(fraction_evaluate=1.0), list(arrays.keys()))
    strategy.partitions = {100 + pid: pid for pid in range(6)}
    strategy.excluded = {1, 3}
    grid = SimpleNamespace(get_node_ids=lambda: list(strategy.partitions))  # all 6 nodes are connected
    for configure in (strategy.configure_train, strategy.configure_evaluate):
        messages = configure(1, arrays, ConfigRecord(), grid)  # type: ignore[arg-type]
        assert sorted(m.metadata.dst_node_id for m in messages) == [100, 102, 104, 105]


def test_too_few_clients_with_data_is_an_error_naming_the_key() -> None:
    cfg = Config()
    cfg.federation.clients, cfg.federation.min_train_clients = 4, 3
    with pytest.raises(DataError, match=r"only 2 of 4 clients .* federation\.min_train_clients=3"):
        excluded_partitions(cfg, fed_data([20, 0, 30, 1]))


@pytest.mark.slow
def test_300_clients_start_without_a_message_per_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 of 300 clients per round: every message sent is a sampled client's train or evaluate instruction;
    the engine asks the LinkState once per message, not once per node every 0.1 s (a round's cost grew with
    the clients in total); the personal layers of the clients that trained are on disk, one file each."""
    from fedlayer.simulation import simulate

    root = write_fmnist(tmp_path / "data", n_train=3000, n_test=200)
    pushed: list[list[str]] = []
    push = InMemoryGrid.push_messages

    def counting(self: InMemoryGrid, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        pushed.append([m.metadata.message_type for m in messages])
        return push(self, messages)

    queried: list[int] = []
    get_message_ins = InMemoryLinkState.get_message_ins

    def counting_queries(
        self: InMemoryLinkState, node_id: int, limit: int | None, **kw: Any
    ) -> list[Message]:
        queried.append(node_id)
        return get_message_ins(self, node_id, limit, **kw)

    monkeypatch.setattr(InMemoryGrid, "push_messages", counting)
    monkeypatch.setattr(InMemoryLinkState, "get_message_ins", counting_queries)
    cfg = load_config(
        ROOT / "experiments/default.toml",
        [
            f"data.root='{root}'",
            "data.partitioner='iid'",
            "data.min_partition_size=5",
            "federation.clients=300",
            "federation.rounds=3",
            "federation.fraction_train=0.01",
            "federation.fraction_evaluate=0.01",
            "model.name='mlp'",
            "train.batch_size=16",
            "strategy.name='fedper'",
        ],
    )
    run = RunDir.create(tmp_path / "run")
    simulate(cfg, run)
    rounds = [MessageType.TRAIN, MessageType.EVALUATE] * 3
    assert [batch[0] for batch in pushed] == rounds  # no query (nor anything else) before round 1
    assert all(len(batch) == 3 and len(set(batch)) == 1 for batch in pushed)  # fraction 0.01 of 300
    assert len(queried) == sum(map(len, pushed)) == 18  # each node asked once per message it was sent
    assert [row["clients_trained"] for row in run.read_jsonl()] == [3, 3, 3]
    store = PersonalStore(run.file("clients"))
    folders = sorted(store.root.glob("partition-*"))
    assert 3 <= len(folders) <= 9  # the clients that trained; the others have no state at all
    assert all(len(list(folder.glob("*.pt"))) == 1 for folder in folders)  # what a resume needs
    personal = shared_layers(cfg, build_model("mlp", 10, 1, 28)).personal_keys
    assert all(list(torch.load(next(f.glob("*.pt")), weights_only=True)) == personal for f in folders)
