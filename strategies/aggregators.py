"""Flower 1.42 strategies used as aggregators of the shared subset."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp import strategy as fl

from fedlayer.config import FederationConfig, StrategyConfig

Factory = Callable[[StrategyConfig, dict[str, Any]], fl.FedAvg]

AGGREGATORS: dict[str, Factory] = {
    "fedavg": lambda s, common: fl.FedAvg(**common),
    "fedprox": lambda s, common: fl.FedProx(proximal_mu=s.proximal_mu, **common),
    "fedmedian": lambda s, common: fl.FedMedian(**common),
    "fedtrimmedavg": lambda s, common: fl.FedTrimmedAvg(beta=s.trim_beta, **common),
    "fedavgm": lambda s, common: fl.FedAvgM(
        server_learning_rate=s.server_lr, server_momentum=s.server_momentum, **common
    ),
    "fedadam": lambda s, common: fl.FedAdam(eta=s.server_lr, **common),
    "fedyogi": lambda s, common: fl.FedYogi(eta=s.server_lr, **common),
    "fedadagrad": lambda s, common: fl.FedAdagrad(eta=s.server_lr, **common),
}


def make_aggregator(
    name: str, strategy: StrategyConfig, federation: FederationConfig, **common: Any
) -> fl.FedAvg:
    """Build the Flower strategy ``name`` with the federation's sampling settings.

    ``common`` carries extra keyword arguments every Flower strategy accepts
    (e.g. ``evaluate_metrics_aggr_fn``). ``name`` is one of the config's ``AGGREGATOR_NAMES`` (validated
    there; a test keeps them equal to ``AGGREGATORS``).
    """
    min_nodes = federation.min_clients
    sampling = {
        "fraction_train": federation.fraction_train,
        "fraction_evaluate": federation.fraction_evaluate,
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes,
        "min_available_nodes": min_nodes,
    }
    return AGGREGATORS[name](strategy, sampling | common)
