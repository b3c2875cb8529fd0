"""Run directory: writes metrics.jsonl, model files and JSON reports (reading, plots: readers, report)."""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedlayer.config import ConfigError
from fedlayer.processes import LOCK_FILE
from fedlayer.readers import METRICS, read_jsonl
from strategies.mechanism import ClientFault, RoundObserver

PLACEMENT, RAY_NODE = "placement", "ray-node-id"  # train replies in simulation: ConfigRecord {RAY_NODE: id}


class RunDir:
    """A run's output folder; never silently overwritten."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False) -> RunDir:
        path = Path(path)
        if path.exists() and any(p.name != LOCK_FILE for p in path.iterdir()) and not overwrite:
            raise ConfigError(f"--out: run directory {str(path)!r} exists and is not empty; pass --overwrite")
        path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            (path / METRICS).unlink(missing_ok=True)
        return cls(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> None:
        self._atomic_write(name, json.dumps(obj, indent=2, default=_jsonable) + "\n")

    def write_text(self, name: str, text: str) -> None:
        self._atomic_write(name, text)

    def append_jsonl(self, name: str, row: dict[str, Any]) -> None:
        with open(self.file(name), "a") as fh:
            fh.write(json.dumps(row, default=_jsonable) + "\n")

    def read_jsonl(self, name: str = METRICS) -> list[dict[str, Any]]:
        return read_jsonl(self.file(name))

    def _atomic_write(self, name: str, text: str) -> None:
        tmp = self.file(name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.file(name))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def client_stats(name: str, values: Sequence[float]) -> dict[str, float]:
    """Mean over clients (unweighted), std and the mean of the worst 10% (at least one client)."""
    if not values:
        return {}
    arr = np.sort(np.asarray(values, dtype=float))
    worst = arr[: max(1, math.ceil(0.1 * len(arr)))]
    return {name: float(arr.mean()), f"{name}_std": float(arr.std()), f"{name}_worst10": float(worst.mean())}


def _reply_metrics(replies: Sequence[Message]) -> list[dict[str, float]]:
    rows = []
    for reply in replies:
        if reply.has_content():
            for record in reply.content.metric_records.values():
                rows.append({k: float(v) for k, v in record.items() if isinstance(v, int | float)})
    return rows


def _payload(messages: Sequence[Message]) -> int:
    total = 0
    for msg in messages:
        if msg.has_content():
            total += sum(record.count_bytes() for record in msg.content.array_records.values())
    return total


def _client_nodes(replies: Sequence[Message]) -> dict[str, str]:
    """Partition id -> Ray node id of the train replies that carry one (simulation), in partition order."""
    nodes = {}
    for reply in replies:
        if reply.has_content() and PLACEMENT in reply.content.config_records:
            partition = int(reply.content.metric_records["metrics"]["partition-id"])  # type: ignore[arg-type]
            nodes[partition] = str(reply.content.config_records[PLACEMENT][RAY_NODE])
    return {str(p): nodes[p] for p in sorted(nodes)}


RoundCallback = Callable[[dict[str, Any]], None]


class RoundRecorder(RoundObserver):
    """Collects a round's client metrics and payload sizes; ``finish_round`` writes the row."""

    CLIENT_KEYS = (
        "train_loss",
        "personalized_acc_before",
        "personalized_acc_after",
        "personalized_loss_after",
    )

    def __init__(self, run: RunDir, on_round: RoundCallback | None = None) -> None:
        self.run = run
        self.on_round = on_round
        self.row: dict[str, Any] = {}
        self.started = time.perf_counter()

    def on_train_messages(self, server_round: int, messages: Sequence[Message]) -> None:
        self.started = time.perf_counter()
        self.row = {"round": server_round, "bytes_down": _payload(messages), "clients_trained": 0}

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        metrics = _reply_metrics(replies)
        self.row["bytes_up"] = _payload(replies)
        self.row["clients_trained"] = len(metrics)
        self.row["client_failures"] = sum(reply.has_error() for reply in replies)
        nodes = _client_nodes(replies)
        if nodes:
            self.row["client_nodes"] = nodes
        for key in self.CLIENT_KEYS:
            self.row |= client_stats(key, [m[key] for m in metrics if key in m])

    def on_sharing(self, server_round: int, shared_blocks: Sequence[str], all_blocks: Sequence[str]) -> None:
        self.row["shared_blocks"] = list(shared_blocks)
        self.row["shared_fraction"] = len(shared_blocks) / max(len(all_blocks), 1)

    def on_client_faults(self, server_round: int, faults: Sequence[ClientFault]) -> None:
        self.row["client_failures"] = sum(f.reason == "error" for f in faults)
        self.row["client_faults"] = len(faults)
        if faults:
            self.row["client_fault_reasons"] = dict(Counter(f.reason for f in faults))
            self.row["faulty_partitions"] = sorted(
                f.partition_id for f in faults if f.partition_id is not None
            )

    def on_evaluate_messages(self, server_round: int, messages: Sequence[Message]) -> None:
        self.row["bytes_down"] = self.row.get("bytes_down", 0) + _payload(messages)

    def on_evaluate_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        metrics = _reply_metrics(replies)
        self.row |= client_stats("personalized_acc", [m["personalized_acc"] for m in metrics])
        self.row |= client_stats("personalized_loss", [m["personalized_loss"] for m in metrics])
        if metrics:
            # Σ correct / Σ test samples, as PFLlib reports it (the mean above weighs clients equally)
            sizes = np.array([m["num-examples"] for m in metrics])
            accs = np.array([m["personalized_acc"] for m in metrics])
            self.row["personalized_acc_pooled"] = float((accs * sizes).sum() / max(sizes.sum(), 1))

    def finish_round(self, server_round: int, global_loss: float, global_acc: float) -> dict[str, Any]:
        """Called by the server's evaluate_fn after each round (round 0: the initial model, not written)."""
        row = {"round": server_round, "global_acc": global_acc, "global_loss": global_loss}
        if server_round > 0:
            row = self.row | row | {"round_seconds": time.perf_counter() - self.started}
            self.run.append_jsonl(METRICS, row)
        if self.on_round is not None:
            self.on_round(row)
        return row


def save_arrays(run: RunDir, name: str, arrays: ArrayRecord) -> None:
    """A state dict (torch.save of tensors only: loads with ``torch.load(weights_only=True)``)."""
    import torch

    tmp = run.file(name + ".tmp")
    torch.save(arrays.to_torch_state_dict(), tmp)
    os.replace(tmp, run.file(name))


class TensorBoardLog:
    """Per-round scalars (every numeric metric of the row) to ``RUN_DIR/tensorboard`` when enabled."""

    def __init__(self, run: RunDir, *, enabled: bool) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run.file("tensorboard")))

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()

    def add(self, row: dict[str, Any]) -> None:
        if self.writer is None or row["round"] == 0:
            return
        for key, value in row.items():
            if key != "round" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, row["round"])
        self.writer.flush()
