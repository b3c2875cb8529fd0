"""Partial aggregation for Flower: one mechanism, many algorithm declarations."""

from strategies.aggregators import AGGREGATORS, make_aggregator
from strategies.algorithms import ALGORITHMS, Algorithm, aggregator_name, get_algorithm
from strategies.mechanism import PartialStrategy, RoundObserver, merge_into, restrict_content, select_arrays

__all__ = [
    "AGGREGATORS",
    "ALGORITHMS",
    "Algorithm",
    "PartialStrategy",
    "RoundObserver",
    "aggregator_name",
    "get_algorithm",
    "make_aggregator",
    "merge_into",
    "restrict_content",
    "select_arrays",
]
