"""Datasets as in-memory tensors (torchvision, offline sources) and client partitions (flwr-datasets)."""

from fedlayer.data.partition import ClientSplit, make_client_splits, subsample, write_partition_report
from fedlayer.data.sources import DataError, TensorData, cache_root, find_data_root, load_dataset

__all__ = [
    "ClientSplit",
    "DataError",
    "TensorData",
    "cache_root",
    "find_data_root",
    "load_dataset",
    "make_client_splits",
    "subsample",
    "write_partition_report",
]
