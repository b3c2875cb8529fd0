"""Personal layers on disk: restored after a restart, only what a resume needs kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlayer.client import app as client_app
from fedlayer.client.store import PersonalStore
from fedlayer.config import load_config, to_toml
from fedlayer.experiment import federated_data, initial_model
from fedlayer.server.app import shared_layers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def head(value: float) -> dict[str, torch.Tensor]:
    return {"fc2.weight": torch.full((2, 3), value), "fc2.bias": torch.full((2,), value)}


def files(store: PersonalStore, pid: int) -> list[str]:
    return sorted(p.name for p in (store.root / f"partition-{pid}").glob("*.pt"))


def test_the_newest_state_of_a_round_up_to_the_asked_one_is_loaded(tmp_path: Path) -> None:
    store = PersonalStore(tmp_path / "clients")
    assert store.load(0, 5) is None  # never trained
    store.save(0, 2, head(2.0))
    store.save(0, 4, head(4.0))
    assert store.load(0, 1) is None
    assert torch.equal(store.load(0, 3)["fc2.bias"], head(2.0)["fc2.bias"])  # type: ignore[index]
    assert torch.equal(store.load(0, 9)["fc2.bias"], head(4.0)["fc2.bias"])  # type: ignore[index]
    # Another process (a restarted SuperNode, a resumed run) sees the same states.
    assert torch.equal(PersonalStore(tmp_path / "clients").load(0, 4)["fc2.weight"], head(4.0)["fc2.weight"])  # type: ignore[index]


def test_disk_holds_one_state_per_client_after_each_checkpoint(tmp_path: Path) -> None:
    """50 rounds, 3 of 10 clients per round: never more than 2 files per client, 1 after the checkpoint."""
    store = PersonalStore(tmp_path)
    rng = np.random.default_rng(0)
    for server_round in range(1, 51):
        trained = sorted(rng.choice(10, size=3, replace=False).tolist())
        for pid in trained:
            store.save(pid, server_round, head(float(server_round)))
            assert len(files(store, pid)) <= 2  # this round's and the one a resume of round - 1 needs
        store.prune(trained, server_round)
        for pid in trained:
            assert files(store, pid) == [f"round-{server_round:06d}.pt"]
    folders = list(tmp_path.glob("partition-*"))
    assert sum(len(files(store, int(f.name.split("-")[1]))) for f in folders) == len(folders)
    assert store.disk_bytes() == sum(p.stat().st_size for p in tmp_path.rglob("*.pt"))


def test_a_resume_drops_states_written_after_the_checkpoint(tmp_path: Path) -> None:
    store = PersonalStore(tmp_path)
    store.save(0, 3, head(3.0))
    store.save(0, 4, head(4.0))  # trained in round 4, killed before the checkpoint of round 4
    store.drop_after(3)
    assert files(store, 0) == ["round-000003.pt"]
    assert torch.equal(store.load(0, 4)["fc2.bias"], head(3.0)["fc2.bias"])  # type: ignore[index]


def test_a_supernode_keeps_one_folder_per_run_under_its_state_dir(tmp_path: Path) -> None:
    config = ConfigRecord({"experiment": "x"})
    node = {"partition-id": 0, "state-dir": str(tmp_path / "node")}
    store = client_app.personal_store(config, Context(7, 1, node, RecordDict(), {}))
    assert store.root == tmp_path / "node" / "run-7"
    default = client_app.personal_store(config, Context(7, 1, {"partition-id": 0}, RecordDict(), {}))
    assert default.root == Path("fedlayer-state") / "run-7"  # relative to the SuperNode's directory
    simulated = ConfigRecord({"experiment": "x", "state-dir": str(tmp_path / "run" / "clients")})
    assert client_app.personal_store(simulated, Context(7, 1, node, RecordDict(), {})).root == (
        tmp_path / "run" / "clients"
    )


def instruction(kind: str, cfg_text: str, shared: ArrayRecord, server_round: int) -> Message:
    config = ConfigRecord({"experiment": cfg_text, "server-round": server_round})
    content = RecordDict({"arrays": shared, "config": config})
    return Message(content, dst_node_id=1, message_type=kind)


def test_a_restarted_client_continues_with_its_trained_personal_layers(
    tiny_fmnist: Path, tmp_path: Path
) -> None:
    """The real ClientApp functions: train in round 1, then a fresh Context (the SuperNode restarted)."""
    cfg = load_config(
        ROOT / "experiments/default.toml",
        [
            f"data.root='{tiny_fmnist}'",
            "data.min_partition_size=5",
            "federation.clients=2",
            "strategy.name='fedper'",
        ],
    )
    text = to_toml(cfg)
    model = initial_model(cfg, federated_data(cfg).test)
    shared = ArrayRecord(
        {k: v for k, v in model.state_dict().items() if k in shared_layers(cfg, model).shared_keys}
    )
    node = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "node")}

    def context(run_id: int = 7) -> Context:
        return Context(run_id, 1, dict(node), RecordDict(), {})

    trained = client_app.train(instruction(MessageType.TRAIN, text, shared, 1), context())
    metrics = trained.content["metrics"]
    before, after = (float(metrics[f"personalized_acc_{k}"]) for k in ("before", "after"))  # type: ignore[arg-type, index]
    assert after > before + 0.1  # the trained head is worth something

    body = trained.content.array_records["arrays"]  # as if the server averaged only this client

    def evaluated(ctx: Context) -> float:
        reply = client_app.evaluate_personalized(instruction(MessageType.EVALUATE, text, body, 1), ctx)
        return float(reply.content["metrics"]["personalized_acc"])  # type: ignore[arg-type]

    assert evaluated(context()) == after  # restored from disk, not from the (empty) context
    assert evaluated(context(run_id=8)) != after  # another run starts from the initial head
    assert (tmp_path / "node" / "run-7" / "partition-0" / "round-000001.pt").exists()


def test_an_unwritable_state_dir_is_named_with_the_node_config_key(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    store = PersonalStore(tmp_path / "file" / "run-7")
    with pytest.raises(OSError, match=r"file/run-7/partition-0 .*node config state-dir"):
        store.save(0, 1, head(1.0))
