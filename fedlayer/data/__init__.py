"""Datasets as in-memory tensors (torchvision, offline sources) and client partitions (flwr-datasets)."""

from fedlayer.data.partition import (
    BAR_PLOT_CLIENTS,
    ClientSplit,
    empty_partitions,
    make_client_splits,
    subsample,
    write_partition_report,
)
from fedlayer.data.sources import DataError, TensorData, cache_root, find_data_root, load_dataset

__all__ = [
    "BAR_PLOT_CLIENTS",
    "ClientSplit",
    "DataError",
    "TensorData",
    "cache_root",
    "empty_partitions",
    "find_data_root",
    "load_dataset",
    "make_client_splits",
    "subsample",
    "write_partition_report",
]
