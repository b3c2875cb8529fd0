"""What the server, every client and the benchmarks derive identically from one config + seed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlayer.config import Config, DataConfig, FederationConfig
from fedlayer.data import (
    ClientSplit,
    TensorData,
    load_dataset,
    make_client_splits,
    subsample,
    write_partition_report,
)
from fedlayer.data.shift import NO_DOMAIN, FeatureShift, apply_domains, assign_domains
from fedlayer.data.sources import clear_dataset_cache
from fedlayer.models import build_model, extend


@dataclass(frozen=True)
class Domains:
    """Feature shift of a federation: the family, each client's domain, each global test image's domain."""

    shift: FeatureShift
    clients: np.ndarray  # (clients,): client i's domain
    test: np.ndarray  # (global test samples,): the domain of each

    def report(self, train: TensorData, splits: list[ClientSplit]) -> dict[str, Any]:
        """What ``partition.json`` records: the family, names, per-domain client and test counts, and one
        sample image per domain (the first training image of its first client) as 8-bit hex pixels."""
        samples = [self.sample(train, splits, k) for k in range(self.shift.domains)]
        return {
            "kind": self.shift.kind,
            "severity": self.shift.severity,
            "names": self.shift.names(),
            "clients_per_domain": np.bincount(self.clients, minlength=self.shift.domains).tolist(),
            "global_test_per_domain": np.bincount(self.test, minlength=self.shift.domains).tolist(),
            "sample_shape": list(train.x.shape[1:]),
            "samples": samples,
        }

    def sample(self, train: TensorData, splits: list[ClientSplit], domain: int) -> str:
        holders = [s for s in splits if self.clients[s.partition_id] == domain and len(s.train_idx)]
        if not holders:
            return ""
        return _hex_pixels(train.subset(holders[0].train_idx[:1]).x)


def _hex_pixels(x: torch.Tensor) -> str:
    """One normalized image's pixels, 0-255 scaled from its own range (no dataset statistics needed)."""
    low, high = float(x.min()), float(x.max())
    scaled = (x - low) / (high - low) if high > low else torch.zeros_like(x)
    return bytes((scaled * 255).round().to(torch.uint8).flatten().tolist()).hex()


@dataclass(frozen=True)
class FederatedData:
    train: TensorData  # the (sub-sampled) training pool the partitions index into
    test: TensorData  # the server's global test set
    splits: list[ClientSplit]
    label_maps: np.ndarray | None = None  # (clients, classes): client i sees label y as label_maps[i, y]
    domains: Domains | None = None  # feature shift (already applied to train and test)

    def client(self, partition_id: int) -> tuple[TensorData, TensorData]:
        """A client's local train and local test data."""
        split = self.splits[partition_id]
        train, test = self.train.subset(split.train_idx), self.train.subset(split.test_idx)
        if self.label_maps is None:
            return train, test
        mapping = torch.as_tensor(self.label_maps[partition_id])
        return (TensorData(d.x, mapping[d.y], d.num_classes) for d in (train, test))  # type: ignore[return-value]

    def write_partition_report(self, run_dir: Path, partitioner: str) -> None:
        """``partition.json`` / ``partition.png`` of these splits, classes named as the dataset names them."""
        write_partition_report(
            run_dir,
            self.splits,
            self.train.y.numpy(),
            self.train.num_classes,
            partitioner=partitioner,
            class_names=self.train.classes,
            client_domains=None if self.domains is None else self.domains.clients.tolist(),
            feature_shift=None if self.domains is None else self.domains.report(self.train, self.splits),
        )


def federated_data(cfg: Config) -> FederatedData:
    """Load, sub-sample and partition the dataset; cached per (data section, clients, seed)."""
    return _federated_data(dataclasses.astuple(cfg.data), cfg.federation.clients, cfg.seed)


@lru_cache(maxsize=2)
def _federated_data(data: tuple[Any, ...], clients: int, seed: int) -> FederatedData:
    """Cached on what determines the data: the [data] values, the number of clients and the seed."""
    cfg = Config(seed=seed, data=DataConfig(*data), federation=FederationConfig(clients=clients))
    train, test = load_dataset(cfg.data.dataset, cfg.data.root, normalize=cfg.data.normalize)
    return partitioned(train, test, cfg)


def release_data() -> None:
    """Drop the cached datasets (a process that only checked a config before starting others)."""
    _federated_data.cache_clear()
    clear_dataset_cache()


def partitioned(train: TensorData, test: TensorData, cfg: Config) -> FederatedData:
    """Sub-sample and partition ``train`` (pooled with ``test`` when ``data.pool = "train+test"``).

    With pooled data the dataset's test set is client data, so the server's global test set is the union
    of the clients' local test splits: it never overlaps what any client trains on.
    """
    d = cfg.data
    pooled = d.pool == "train+test"
    if pooled:
        train = TensorData.concat([train, test])
    train = train.subset(subsample(len(train), d.max_samples, cfg.seed))
    splits = make_client_splits(train.y.numpy(), d, cfg.federation.clients, cfg.seed)
    if not pooled:
        test = test.subset(subsample(len(test), d.max_test_samples, cfg.seed))
    train, test, domains = _shifted(train, test, splits, cfg)
    if pooled:
        test_idx = np.sort(np.concatenate([s.test_idx for s in splits]))
        test = train.subset(test_idx)
        test = test.subset(keep := subsample(len(test), d.max_test_samples, cfg.seed))
        if domains is not None:
            domains = dataclasses.replace(domains, test=domains.test[test_idx][keep])
    labels = _label_maps(d.label_shift, len(splits), train.num_classes, cfg.seed)
    return FederatedData(train, test, splits, labels, domains)


def _shifted(
    train: TensorData, test: TensorData, splits: list[ClientSplit], cfg: Config
) -> tuple[TensorData, TensorData, Domains | None]:
    """``data.feature_shift``: every client's samples (train and test) in its domain, and the dataset's test
    set image j in domain j mod domains. Pooled data: ``Domains.test`` is per training-pool sample until the
    caller picks the global test set from it."""
    d = cfg.data
    if d.feature_shift == "none":
        return train, test, None
    shift = FeatureShift(d.feature_shift, d.domains, d.severity, cfg.seed)
    clients = assign_domains(len(splits), d.domains, d.domain_assignment, cfg.seed)
    pool = np.full(len(train), NO_DOMAIN)
    for split in splits:
        pool[split.train_idx] = pool[split.test_idx] = clients[split.partition_id]
    train = apply_domains(train, pool, shift, d.dataset, d.normalize)
    if d.pool == "train+test":
        return train, test, Domains(shift, clients, pool)
    round_robin = np.arange(len(test)) % d.domains
    test = apply_domains(test, round_robin, shift, d.dataset, d.normalize)
    return train, test, Domains(shift, clients, round_robin)


def _label_maps(shift: str, clients: int, classes: int, seed: int) -> np.ndarray | None:
    """``permute``: a seeded label permutation per client (concept shift: P(y | x) differs between clients;
    client 0 keeps the dataset's labels)."""
    if shift == "none":
        return None
    rng = np.random.default_rng([seed, 0x1AB])
    maps = [np.arange(classes)] + [rng.permutation(classes) for _ in range(clients - 1)]
    return np.stack(maps)


def initial_model(cfg: Config, data: TensorData, extension: str | None = None) -> nn.Module:
    """The common initial model: identical on the server and every client for a given seed.

    ``extension``: the algorithm's model extension (its declaration's ``extension``; see
    :func:`fedlayer.models.extend`), which the server and the clients must both pass.
    """
    torch.manual_seed(cfg.seed)
    _, channels, size, _ = data.x.shape
    model = build_model(cfg.model.name, data.num_classes, channels, size, cfg.model.norm)
    return extend(model, extension, cfg.strategy)


def client_generator(cfg: Config, partition_id: int, server_round: int) -> torch.Generator:
    """A client's batch-order RNG for one round, independent of scheduling order."""
    return _generator(cfg.seed, partition_id, server_round)


def cost_generator(cfg: Config, partition_id: int, server_round: int) -> torch.Generator:
    """A client's RNG for the sample its sharing costs are measured on (``lmc``), apart from training's."""
    return _generator(cfg.seed, partition_id, server_round, 1)


def holdout_generator(cfg: Config, partition_id: int) -> torch.Generator:
    """A client's RNG for the slice of its training data it holds out (``lmc`` mixing): one per client for
    the whole run, so the slice is the same every round."""
    return _generator(cfg.seed, partition_id, 0, 2)


def _generator(*entropy: int) -> torch.Generator:
    seed = np.random.SeedSequence(list(entropy)).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))
