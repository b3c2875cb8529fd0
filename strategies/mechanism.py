"""Partial aggregation: any Flower strategy applied to the shared subset of the model only."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedlayer.contract import (
    ANALYSIS_ROUND,
    ARRAYS,
    CRITICAL,
    CUSTOMIZED,
    FULL_MODEL,
    LMC_MEASURE,
    NUM_EXAMPLES,
    REFERENCE,
    SHADOW,
    error_cause,
    partition_of,
)
from strategies.fedcac import CriticalCollaboration, Tensors
from strategies.sharing import SharingPolicy


class RoundObserver:
    """Sees every message of a round; subclasses override what they need (metrics, analysis hook)."""

    def on_train_messages(self, server_round: int, messages: Sequence[Message]) -> None:
        """Train instructions, just before they are sent."""

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        """Train replies as the clients sent them (full models on analysis rounds)."""

    def on_aggregated(self, server_round: int, previous: ArrayRecord, aggregated: ArrayRecord) -> None:
        """The round's starting global model and the new one (both full ArrayRecords)."""

    def on_evaluate_messages(self, server_round: int, messages: Sequence[Message]) -> None:
        """Evaluate instructions, just before they are sent."""

    def on_evaluate_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        """Evaluate replies (personalized metrics of each client)."""

    def on_client_faults(self, server_round: int, faults: Sequence[ClientFault]) -> None:
        """Train replies excluded from this round's aggregation (after ``on_train_replies``)."""

    def on_sharing(self, server_round: int, shared_blocks: Sequence[str], all_blocks: Sequence[str]) -> None:
        """The blocks shared in this round (called when it is configured, for dynamic sharing only)."""


def select_arrays(record: ArrayRecord, keys: Iterable[str]) -> ArrayRecord:
    """The sub-record holding ``keys``, in that order."""
    return ArrayRecord({key: record[key] for key in keys})


def restrict_content(content: RecordDict, keys: Sequence[str]) -> RecordDict:
    """A copy of a reply's content whose ArrayRecords hold only ``keys``."""
    return RecordDict(
        {
            name: select_arrays(value, keys) if isinstance(value, ArrayRecord) else value
            for name, value in content.items()
        }
    )


def without_metrics(content: RecordDict, prefix: str | tuple[str, ...]) -> RecordDict:
    """A copy of a reply's content whose MetricRecords lack the metrics named ``<prefix>...`` (any of
    them, for a tuple)."""
    return RecordDict(
        {
            name: MetricRecord({k: v for k, v in value.items() if not k.startswith(prefix)})
            if isinstance(value, MetricRecord)
            else value
            for name, value in content.items()
        }
    )


def merge_into(full: ArrayRecord, part: ArrayRecord) -> ArrayRecord:
    """``full`` with the keys of ``part`` replaced, each cast back to the dtype it had in ``full``.

    Flower's aggregators average in float; integer buffers (BatchNorm's ``num_batches_tracked``)
    are rounded back so the global model keeps its state-dict dtypes.
    """
    merged = ArrayRecord()
    for key, array in full.items():
        if key not in part:
            merged[key] = array
            continue
        value, dtype = part[key].numpy(), array.numpy().dtype
        if np.issubdtype(dtype, np.integer):
            value = np.rint(value)
        merged[key] = Array(np.array(value, dtype=dtype))  # np.ascontiguousarray would make 0-d arrays 1-d
    return merged


@dataclass(frozen=True)
class ClientFault:
    """A train reply excluded from aggregation: ``reason`` is one of :data:`FAULT_REASONS`."""

    node_id: int
    partition_id: int | None
    reason: str
    detail: str


FAULT_REASONS = ("error", "malformed", "missing-keys", "extra-keys", "shape", "nan", "inf")


class RoundFailedError(RuntimeError):
    """Too few valid client updates for the strategy's minimum: the run ends (its last checkpoint stays)."""


UPLINK = {CRITICAL, SHADOW}  # ArrayRecords a reply may carry beside ARRAYS (fedcac's masks, lmc's shadows)


def reply_fault(
    reply: Message, reference: ArrayRecord, required: set[str], allowed: set[str]
) -> tuple[str, str]:
    """("", "") for a usable train reply, else (reason, detail); shapes are checked against ``reference``."""
    if reply.has_error():
        return "error", error_cause(reply.error.reason or "")[:500]
    content = reply.content
    if set(content.array_records) - UPLINK != {ARRAYS} or len(content.metric_records) != 1:
        return "malformed", f"expected the ArrayRecord {ARRAYS!r} and one MetricRecord"
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(NUM_EXAMPLES)
    if not isinstance(weight, int | float) or not np.isfinite(weight) or weight <= 0:
        return "malformed", f"num-examples = {weight!r}"
    arrays = content.array_records[ARRAYS]
    keys = set(arrays.keys())
    if missing := sorted(required - keys):
        return "missing-keys", ", ".join(missing[:5])
    if extra := sorted(keys - allowed):
        return "extra-keys", ", ".join(extra[:5])
    for key in sorted(required):
        if key in reference and tuple(arrays[key].shape) != tuple(reference[key].shape):
            return "shape", f"{key}: {tuple(arrays[key].shape)} != {tuple(reference[key].shape)}"
    shadows = content.array_records.get(SHADOW, ArrayRecord())
    for key, array in [*((k, arrays[k]) for k in sorted(keys)), *shadows.items()]:
        value = array.numpy()
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return ("nan" if np.isnan(value).any() else "inf"), key
    # A diverged client is visible in its metrics even when it sends no arrays (`local`, personal layers).
    for name, number in metrics.items():
        if isinstance(number, float) and not np.isfinite(number):
            return ("nan" if np.isnan(number) else "inf"), f"metric {name}"
    return "", ""


class _OrderedGrid:
    """A Grid whose node ids come sorted by partition id, so seeded sampling picks the same partitions;
    nodes of ``excluded`` partitions are left out."""

    def __init__(self, grid: Grid, partitions: dict[int, int], excluded: set[int]) -> None:
        self._grid, self._partitions, self._excluded = grid, partitions, excluded

    def get_node_ids(self) -> list[int]:
        nodes = [n for n in self._grid.get_node_ids() if self._partitions.get(n) not in self._excluded]
        return sorted(nodes, key=lambda n: (self._partitions.get(n, len(nodes)), n))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class PartialStrategy(Strategy):
    """Aggregates only ``shared_keys`` with the Flower strategy ``base``; clients keep the rest.

    Parameters
    ----------
    base : FedAvg
        Any Flower 1.42 strategy derived from FedAvg (FedAvg, FedProx, FedMedian, FedTrimmedAvg,
        FedAvgM, FedAdam, ...). It samples nodes, validates replies and aggregates the shared subset.
    shared_keys : Sequence[str]
        State-dict keys sent to clients and averaged; every other key is personal.
    full_model_rounds : Callable[[int], bool], optional
        Rounds in which clients return their full models (analysis rounds); personal keys are
        dropped again before aggregation.
    downlink : CriticalCollaboration, optional
        Per-client models (FedCAC): after each round's training it reads the replies' ``critical`` masks
        and models; each later instruction to a client carries that client's ``customized`` model.
    evaluate_rounds : Callable[[int], bool], optional
        Rounds whose clients evaluate (``federation.evaluate_every``); in the others no evaluate
        instruction is sent. Every round by default.
    observers : Sequence[RoundObserver], optional
        Metrics recorder, analysis hook, ...
    sampling_seed : int, optional
        Client sampling in round r depends only on (seed, r) and the partition ids, not on node ids.
    sharing : SharingPolicy, optional
        Decides the shared blocks per round (``lmc``); ``None`` shares ``shared_keys`` in every round.
        In a decision round clients send every block up; the sample-weighted average of the blocks
        personal in that round becomes the server's value of them: the reference clients measure
        against next time, and the starting point of a block that turns shared.

    Attributes
    ----------
    round_offset : int
        Rounds already done before this ``start`` (resuming): added to Flower's round numbers.
    partitions : dict[int, int]
        Node id -> partition id, set up front (simulation, SuperNode query) or learned from replies.
    excluded : set[int]
        Partition ids never sampled (clients without data).
    recipients : dict[str, int]
        Message id -> destination node of this round's train instructions. When a SuperNode is gone, the
        SuperLink answers in its place (the reply's source is the SuperLink); the instruction it replies
        to names the node, and ``partitions`` its partition.
    """

    def __init__(
        self,
        base: FedAvg,
        shared_keys: Sequence[str],
        *,
        full_model_rounds: Callable[[int], bool] = lambda _: False,
        evaluate_rounds: Callable[[int], bool] = lambda _: True,
        downlink: CriticalCollaboration | None = None,
        observers: Sequence[RoundObserver] = (),
        sampling_seed: int = 0,
        sharing: SharingPolicy | None = None,
    ) -> None:
        self.base = base
        self.sampling_seed = sampling_seed
        self.round_offset = 0
        self.partitions: dict[int, int] = {}
        self.excluded: set[int] = set()
        self.recipients: dict[str, int] = {}
        self._train_messages: list[Message] = []
        self.sharing = sharing
        self.shared_keys = sharing.shared_keys() if sharing is not None else list(shared_keys)
        self.full_model_rounds = full_model_rounds
        self.evaluate_rounds = evaluate_rounds
        self.downlink = downlink
        self.observers = list(observers)
        self.global_arrays = ArrayRecord()

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> Partial aggregation of %d shared keys with %s",
            len(self.shared_keys),
            type(self.base).__name__,
        )
        self.base.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self.global_arrays = arrays
        sharing = self.sharing
        if sharing is not None:
            self.shared_keys = sharing.shared_keys()
            sharing.record(server_round)
        collect = sharing is not None and sharing.collects(server_round)
        measure = sharing is not None and sharing.clients_measure(server_round)
        analysis = self.full_model_rounds(server_round)
        full = analysis or collect
        config = ConfigRecord(
            dict(config) | {FULL_MODEL: full, LMC_MEASURE: measure, ANALYSIS_ROUND: analysis}
        )
        messages = self._sampled("train", server_round, grid, self.base.configure_train, arrays, config)
        messages = self._per_client(messages)
        if sharing is not None and measure and collect and messages:
            # One RecordDict is shared by all messages: the reference of the personal blocks is added once.
            reference = sharing.reference_keys(self._personal_keys())
            messages[0].content[REFERENCE] = select_arrays(arrays, reference)
        self._train_messages = messages  # the Grid sets their message ids when it sends them
        for observer in self.observers:
            observer.on_train_messages(server_round, messages)
        if sharing is not None and sharing.dynamic:
            for observer in self.observers:
                observer.on_sharing(server_round, sharing.shared_blocks(), list(sharing.blocks))
        return messages

    def _personal_keys(self) -> list[str]:
        shared = set(self.shared_keys)
        return [key for key in self.global_arrays if key not in shared]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        sent = [m.metadata for m in self._train_messages if m.metadata.message_id]
        self.recipients = {m.message_id: m.dst_node_id for m in sent}
        replies, faults = self.screen(server_round, list(replies))
        for observer in self.observers:
            observer.on_train_replies(server_round, replies)
        for observer in self.observers:
            observer.on_client_faults(server_round, faults)
        if len(replies) < self.base.min_train_nodes:
            raise RoundFailedError(
                f"round {server_round}: {len(replies)} valid client updates < federation.min_train_clients"
                f"={self.base.min_train_nodes}; excluded: {_describe(faults)}"
            )
        personal = self._decide(server_round, replies)
        if self.downlink is not None:
            self.downlink.observe(server_round, _uploads(replies))
        for reply in replies:
            if reply.has_content():
                reply.content = self._aggregated_part(reply.content)
        if not self.shared_keys:
            merged, metrics = self.global_arrays, self._aggregate_metrics_only(replies)
        else:
            shared, metrics = self.base.aggregate_train(server_round, replies)
            if shared is None:
                return None, metrics
            merged = merge_into(self.global_arrays, shared)
        if personal is not None:
            merged = merge_into(merged, personal)
        for observer in self.observers:
            observer.on_aggregated(server_round, self.global_arrays, merged)
        return merged, metrics

    def _aggregated_part(self, content: RecordDict) -> RecordDict:
        """What the base aggregator sees of a reply: the shared keys, and no sharing evidence (the policy
        has read it; a client with nothing to weigh yet, in its first round under sampling, reports none,
        and Flower refuses to aggregate replies whose metric keys differ)."""
        shared = restrict_content(_without_shadows(content), self.shared_keys)
        return shared if self.sharing is None else without_metrics(shared, self.sharing.evidence_prefixes)

    def _decide(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        """In a decision round: the next shared set from the clients' costs, and the sample-weighted
        average of this round's personal blocks (``None`` in other rounds)."""
        if self.sharing is None or not self.sharing.measures(server_round) or not replies:
            return None
        metrics = [next(iter(reply.content.metric_records.values())) for reply in replies]
        weights = [float(cast(float, m[NUM_EXAMPLES])) for m in metrics]
        if self.sharing.clients_measure(server_round):
            self.sharing.decide(server_round, [self.sharing.evidence_of(m) for m in metrics], weights)
        keys = self._personal_keys()
        if not keys or not self.sharing.collects(server_round):
            return None
        contents = [restrict_content(_with_shadows(reply.content), keys) for reply in replies]
        return aggregate_arrayrecords(contents, self.base.weighted_by_key)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.evaluate_rounds(server_round):
            return []
        messages = self._sampled("evaluate", server_round, grid, self.base.configure_evaluate, arrays, config)
        messages = self._per_client(messages)
        for observer in self.observers:
            observer.on_evaluate_messages(server_round, messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        if not self.evaluate_rounds(server_round):
            return None
        replies = self._in_partition_order(list(replies))
        for observer in self.observers:
            observer.on_evaluate_replies(server_round, replies)
        return self.base.aggregate_evaluate(server_round, replies)

    def screen(self, server_round: int, replies: list[Message]) -> tuple[list[Message], list[ClientFault]]:
        """Usable train replies in partition order, and the excluded ones (each logged).

        Flower's validation would abort the whole run on one inconsistent reply; a NaN update would
        silently poison the average. Keys of the model that are not shared (full-model rounds) are allowed.
        """
        replies = self._in_partition_order(replies)
        required = set(self.shared_keys)
        allowed = required | set(self.global_arrays.keys())  # personal keys are dropped later, not faults
        good: list[Message] = []
        faults: list[ClientFault] = []
        for reply in replies:
            reason, detail = reply_fault(reply, self.global_arrays, required, allowed)
            if not reason:
                good.append(reply)
                continue
            node = self.node_of(reply)
            fault = ClientFault(node, partition_of(reply, self.partitions, node), reason, detail)
            log(
                WARNING,
                "round %d: client partition-id=%s excluded (%s: %s)",
                server_round,
                fault.partition_id,
                reason,
                detail,
            )
            faults.append(fault)
        return good, faults

    def node_of(self, reply: Message) -> int:
        """The node a reply is about: its source, or the recipient of the instruction it answers."""
        return self.recipients.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _in_partition_order(self, replies: list[Message]) -> list[Message]:
        """Replies sorted by partition id: float sums then do not depend on which client finished first."""
        for reply in replies:
            pid = partition_of(reply, {})
            if pid is not None:
                self.partitions[reply.metadata.src_node_id] = pid

        def order(reply: Message) -> tuple[int, int]:
            node = self.node_of(reply)
            pid = partition_of(reply, self.partitions, node)
            return (-1 if pid is None else pid, node)

        return sorted(replies, key=order)

    def _sampled(
        self,
        kind: str,
        server_round: int,
        grid: Grid,
        configure: Callable[[int, ArrayRecord, ConfigRecord, Grid], Iterable[Message]],
        arrays: ArrayRecord,
        config: ConfigRecord,
    ) -> list[Message]:
        """Flower samples with the global ``random``; seed it per (seed, kind, round) and restore it."""
        state = random.getstate()
        random.seed(f"{self.sampling_seed}:{kind}:{server_round}")
        try:
            ordered = cast(Grid, _OrderedGrid(grid, self.partitions, self.excluded))
            return list(configure(server_round, self._shared(arrays), config, ordered))
        finally:
            random.setstate(state)

    def _per_client(self, messages: list[Message]) -> list[Message]:
        """With a per-client downlink, each message gets its own content: the common one plus the client's
        ``customized`` record (Flower's strategies give all messages one RecordDict)."""
        if self.downlink is None:
            return messages
        found = []
        for msg in messages:
            partition = self.partitions.get(msg.metadata.dst_node_id)
            extra = self.downlink.downlink(partition) if partition is not None else None
            if extra is not None:
                content = RecordDict(dict(msg.content.items()) | {CUSTOMIZED: extra})
                meta = msg.metadata
                msg = Message(content, meta.dst_node_id, meta.message_type, group_id=meta.group_id)
            found.append(msg)
        return found

    def _shared(self, arrays: ArrayRecord) -> ArrayRecord:
        return select_arrays(arrays, self.shared_keys)

    def _aggregate_metrics_only(self, replies: list[Message]) -> MetricRecord | None:
        """Nothing is shared (independent local training): keep Flower's metric aggregation."""
        valid = [reply.content for reply in replies if not reply.has_error()]
        if not valid:
            return None
        return self.base.train_metrics_aggr_fn(valid, self.base.weighted_by_key)


def _uploads(replies: Sequence[Message]) -> dict[int, tuple[Tensors, Tensors]]:
    """Partition id -> (model, critical mask) of the train replies that carry a mask; the masks are taken
    out of the replies (Flower's aggregation expects one ArrayRecord)."""
    found: dict[int, tuple[Tensors, Tensors]] = {}
    for reply in replies:
        if reply.has_content() and CRITICAL in reply.content.array_records:
            mask = reply.content.array_records[CRITICAL].to_torch_state_dict()
            del reply.content[CRITICAL]
            partition = partition_of(reply, {})
            if partition is not None:
                found[partition] = (reply.content.array_records[ARRAYS].to_torch_state_dict(), mask)
    return found


def _with_shadows(content: RecordDict) -> RecordDict:
    """A reply's content for the reference of the personal blocks: its model, with the blocks its ``shadow``
    record holds (``lmc_criterion = "shadow"``: the client's copies of its personal tail blocks that followed
    the shared trajectory) in place of its own copies, if it sent them; without that record, the content."""
    shadows = content.array_records.get(SHADOW)
    if shadows is None:
        return content
    arrays = cast(ArrayRecord, content[ARRAYS])
    merged = ArrayRecord({key: shadows[key] if key in shadows else arrays[key] for key in arrays})
    for key in shadows:  # outside analysis rounds the client's own copies do not travel at all
        merged[key] = shadows[key]
    return RecordDict({ARRAYS: merged, **content.metric_records})


def _without_shadows(content: RecordDict) -> RecordDict:
    """A reply's content without its ``shadow`` record (read for the reference only)."""
    if SHADOW not in content.array_records:
        return content
    return RecordDict({name: value for name, value in content.items() if name != SHADOW})


def _describe(faults: Sequence[ClientFault]) -> str:
    return "; ".join(f"partition-id={f.partition_id} {f.reason} ({f.detail})" for f in faults) or "none"
