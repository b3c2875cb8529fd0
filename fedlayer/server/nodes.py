"""Which node holds which partition, and which nodes the server may sample.

Seeded sampling orders nodes by partition id, so the server needs the node -> partition mapping before
round 1: Flower's simulation engine gives it without a message; SuperNodes are asked once. Clients whose
partition holds fewer than 2 samples are never sampled.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlayer import flower
from fedlayer.config import Config
from fedlayer.contract import METRICS, PARTITION_ID, partition_of
from fedlayer.data import DataError, empty_partitions
from fedlayer.experiment import FederatedData
from strategies.mechanism import RoundObserver


def excluded_partitions(cfg: Config, data: FederatedData) -> list[int]:
    """Partitions without a training or a local test sample: left out of training and evaluation.

    Counting them would add accuracy-0 clients (nothing to test on) and zero-weight updates. Raises
    ``DataError`` when fewer than ``federation.min_train_clients`` clients would remain.
    """
    empty = empty_partitions(data.splits)
    usable = len(data.splits) - len(empty)
    needed = min(cfg.federation.min_train_clients, cfg.federation.clients)
    if usable < needed:
        raise DataError(
            f"data.partitioner: only {usable} of {len(data.splits)} clients hold at least 2 samples, fewer "
            f"than federation.min_train_clients={needed}; raise data.alpha or data.max_samples, or lower "
            "federation.clients"
        )
    return empty


def node_partitions(grid: Grid, cfg: Config, excluding: bool) -> dict[int, int]:
    """What seeded sampling (and leaving clients out) needs to know before round 1.

    A simulation knows it for free; SuperNodes are asked (one message each, in parallel) only when
    sampling or exclusion needs it: otherwise replies teach the strategy.
    """
    simulated = flower.simulated_partitions(grid, cfg.federation.clients)
    if simulated is not None:
        return simulated
    f = cfg.federation
    return discover_partitions(grid) if f.fraction_train < 1 or f.fraction_evaluate < 1 or excluding else {}


def discover_partitions(grid: Grid) -> dict[int, int]:
    """Node id -> partition id of the connected SuperNodes (a ``query.partition`` message to each)."""
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type=f"{MessageType.QUERY}.partition")
        for node in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(messages)
    return {
        r.metadata.src_node_id: int(r.content[METRICS][PARTITION_ID])  # type: ignore[arg-type]
        for r in replies
        if r.has_content()
    }


class PartitionCheck(RoundObserver):
    """Fails the run when a reply's partition id contradicts the node -> partition mapping assumed up front
    (sampling would no longer be reproducible, nor excluded clients left out)."""

    def __init__(self, partitions: dict[int, int]) -> None:
        self.partitions = dict(partitions)

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        for reply in replies:
            node, pid = reply.metadata.src_node_id, partition_of(reply, {})
            if pid is not None and self.partitions.get(node, pid) != pid:
                raise RuntimeError(
                    f"node {node} replied as partition-id={pid} but was taken for partition-id="
                    f"{self.partitions[node]}: the engine's node order is not the partition order"
                )

    on_evaluate_replies = on_train_replies
