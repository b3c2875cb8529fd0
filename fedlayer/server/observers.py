"""The server's round observers that are not an algorithm's: the metrics row, memory, interruption, the
analysis hook's feed.

A :class:`strategies.RoundObserver` sees every message of a round; the mechanism calls them in order.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedlayer.config import Config
from fedlayer.contract import (
    ARRAYS,
    EVALUATE_METRICS,
    FINETUNE_METRICS,
    GLOBAL,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    PLACEMENT,
    RAY_NODE,
    TRAIN_METRICS,
)
from fedlayer.run import files
from fedlayer.run.rundir import RunDir
from fedlayer.server.hook import AnalysisHook, is_analysis_round
from strategies.mechanism import ClientFault, RoundObserver

RoundCallback = Callable[[dict[str, Any]], None]


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
            partition = int(reply.content.metric_records[METRICS][PARTITION_ID])  # type: ignore[arg-type]
            nodes[partition] = str(reply.content.config_records[PLACEMENT][RAY_NODE])
    return {str(p): nodes[p] for p in sorted(nodes)}


@dataclass(frozen=True)
class PooledEvaluation:
    """The clients' evaluate-phase results of one round pooled over their test samples."""

    loss: float  # Σ loss_i n_i / n
    acc: float  # Σ correct_i / n
    samples: int  # n = Σ n_i


def pooled_evaluation(metrics: Sequence[dict[str, float]]) -> PooledEvaluation | None:
    """Pool per-client ``personalized_loss`` / ``personalized_acc`` (means over ``num-examples`` samples);
    the correct counts are whole numbers, so the pooled accuracy is Σ correct / Σ n exactly."""
    sizes = np.array([m[NUM_EXAMPLES] for m in metrics], dtype=float)
    if not len(sizes) or sizes.sum() == 0:
        return None
    correct = np.rint(np.array([m["personalized_acc"] for m in metrics]) * sizes)
    losses = np.array([m["personalized_loss"] for m in metrics])
    n = int(sizes.sum())
    return PooledEvaluation(float((losses * sizes).sum() / n), float(correct.sum() / n), n)


class RoundRecorder(RoundObserver):
    """Collects a round's client metrics and payload sizes; ``finish_round`` writes the row.

    ``pooled`` is the round's evaluate phase pooled over the clients (None before it), which the server's
    evaluation may use instead of evaluating the same model on the same samples again.
    """

    CLIENT_KEYS = TRAIN_METRICS

    def __init__(self, run: RunDir, on_round: RoundCallback | None = None) -> None:
        self.run = run
        self.on_round = on_round
        self.row: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.pooled: PooledEvaluation | None = None

    def on_train_messages(self, server_round: int, messages: Sequence[Message]) -> None:
        self.started = time.perf_counter()
        self.row = {"round": server_round, "bytes_down": _payload(messages), "clients_trained": 0}
        self.pooled = None

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
            self.row["client_fault_details"] = [
                {"partition": f.partition_id, "node": f.node_id, "reason": f.reason, "detail": f.detail}
                for f in faults
            ]

    def on_evaluate_messages(self, server_round: int, messages: Sequence[Message]) -> None:
        self.row["bytes_down"] = self.row.get("bytes_down", 0) + _payload(messages)

    def on_evaluate_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        metrics = _reply_metrics(replies)
        for key in EVALUATE_METRICS:
            self.row |= client_stats(key, [m[key] for m in metrics])
        for key in FINETUNE_METRICS:
            self.row |= client_stats(key, [m[key] for m in metrics if key in m])
        self.pooled = pooled_evaluation(metrics)
        if self.pooled is not None:
            # Σ correct / Σ test samples, as PFLlib reports it (the mean above weighs clients equally)
            self.row["personalized_acc_pooled"] = self.pooled.acc

    def finish_round(
        self, server_round: int, global_loss: float | None = None, global_acc: float | None = None
    ) -> dict[str, Any]:
        """Called by the server's evaluate_fn after each round (round 0: the initial model, not written);
        a round that is not evaluated (``federation.evaluate_every``) has no global loss and accuracy."""
        row: dict[str, Any] = {"round": server_round}
        if global_loss is not None:
            row |= {"global_acc": global_acc, "global_loss": global_loss}
        if server_round > 0:
            row = self.row | row | {"round_seconds": time.perf_counter() - self.started}
            self.run.append_jsonl(files.METRICS, row)
        if self.on_round is not None:
            self.on_round(row)
        return row


class HeapTrim(RoundObserver):
    """Hands the memory freed during a round back to the OS (glibc's ``malloc_trim``; elsewhere a no-op).

    The engine (de)serializes every message in its own threads; glibc keeps what they free in per-thread
    arenas, and the server's RSS crept up ~0.1 MiB per round without this (bench/memory.py).
    """

    def __init__(self) -> None:
        libc = ctypes.util.find_library("c")
        self._trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None

    def on_evaluate_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        if self._trim is not None:
            self._trim(0)


class AnalysisObserver(RoundObserver):
    """Hands the full client models of analysis rounds (and the new global model) to the analysis hook."""

    def __init__(self, cfg: Config, hook: AnalysisHook) -> None:
        self.cfg, self.hook = cfg, hook
        self.models: dict[int | str, dict] = {}

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        if not is_analysis_round(self.cfg.analysis, server_round):
            return
        for reply in replies:
            if reply.has_content():
                pid = int(reply.content.metric_records[METRICS][PARTITION_ID])  # type: ignore[arg-type]
                self.models[pid] = reply.content.array_records[ARRAYS].to_torch_state_dict()

    def on_aggregated(self, server_round: int, previous: ArrayRecord, aggregated: ArrayRecord) -> None:
        if not self.models:
            self.hook.poll()
            return
        models, self.models = self.models, {}
        if self.cfg.analysis.pairs in ("global", "both"):
            models[GLOBAL] = aggregated.to_torch_state_dict()
        self.hook.submit(server_round, models, previous.to_torch_state_dict())


class Interruption(RoundObserver):
    """Calls ``interrupt`` as soon as a round's replies are in, before they count: the replies of clients
    stopped by an interruption must be neither faults nor results."""

    def __init__(self, interrupt: Callable[[], None]) -> None:
        self.interrupt = interrupt

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        self.interrupt()

    def on_evaluate_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        self.interrupt()
