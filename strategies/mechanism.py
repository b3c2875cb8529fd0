"""Partial aggregation: any Flower strategy applied to the shared subset of the model only."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy


class RoundObserver:
    """Sees every message of a round; subclasses override what they need (metrics, analysis hook)."""

    def on_train_messages(self, server_round: int, messages: Sequence[Message]) -> None:
        """Train instructions, just before they are sent."""

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        """Train replies as the clients sent them (full models on analysis rounds)."""

    def on_evaluate_messages(self, server_round: int, messages: Sequence[Message]) -> None:
        """Evaluate instructions, just before they are sent."""

    def on_evaluate_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        """Evaluate replies (personalized metrics of each client)."""


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
    observers : Sequence[RoundObserver], optional
        Metrics recorder, analysis hook, ...
    """

    def __init__(
        self,
        base: FedAvg,
        shared_keys: Sequence[str],
        *,
        full_model_rounds: Callable[[int], bool] = lambda _: False,
        observers: Sequence[RoundObserver] = (),
    ) -> None:
        self.base = base
        self.shared_keys = list(shared_keys)
        self.full_model_rounds = full_model_rounds
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
        self.global_arrays = arrays
        config = ConfigRecord(dict(config) | {"full-model": self.full_model_rounds(server_round)})
        messages = list(self.base.configure_train(server_round, self._shared(arrays), config, grid))
        for observer in self.observers:
            observer.on_train_messages(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for observer in self.observers:
            observer.on_train_replies(server_round, replies)
        for reply in replies:
            if reply.has_content():
                reply.content = restrict_content(reply.content, self.shared_keys)
        if not self.shared_keys:
            return self.global_arrays, self._aggregate_metrics_only(replies)
        shared, metrics = self.base.aggregate_train(server_round, replies)
        if shared is None:
            return None, metrics
        return merge_into(self.global_arrays, shared), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.base.configure_evaluate(server_round, self._shared(arrays), config, grid))
        for observer in self.observers:
            observer.on_evaluate_messages(server_round, messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for observer in self.observers:
            observer.on_evaluate_replies(server_round, replies)
        return self.base.aggregate_evaluate(server_round, replies)

    def _shared(self, arrays: ArrayRecord) -> ArrayRecord:
        return select_arrays(arrays, self.shared_keys)

    def _aggregate_metrics_only(self, replies: list[Message]) -> MetricRecord | None:
        """Nothing is shared (independent local training): keep Flower's metric aggregation."""
        valid = [reply.content for reply in replies if not reply.has_error()]
        if not valid:
            return None
        return self.base.train_metrics_aggr_fn(valid, self.base.weighted_by_key)
