"""Client partitions (flwr-datasets partitioners on in-memory labels) and the partition report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from fedlayer.config import PARTITIONERS, DataConfig
from fedlayer.data import (
    BAR_PLOT_CLIENTS,
    ClientSplit,
    DataError,
    empty_partitions,
    make_client_splits,
    subsample,
    write_partition_report,
)
from fedlayer.data import partition as partition_module

N, CLIENTS = 1000, 10
LABELS = np.random.default_rng(7).permutation(np.arange(N) % 10)  # 100 samples per class, shuffled


def splits_for(
    partitioner: str, seed: int = 0, labels: np.ndarray = LABELS, **kw: object
) -> list[ClientSplit]:
    return make_client_splits(labels, DataConfig(partitioner=partitioner, **kw), CLIENTS, seed)  # type: ignore[arg-type]


def partitions(splits: list[ClientSplit]) -> list[np.ndarray]:
    return [np.concatenate([s.train_idx, s.test_idx]) for s in splits]


def top2_share(labels: np.ndarray) -> float:
    """Fraction of a client's samples in its two most frequent classes."""
    counts = np.sort(np.bincount(labels, minlength=10))
    return float(counts[-2:].sum() / counts.sum())


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_partitions_are_disjoint_and_cover_the_dataset(partitioner: str) -> None:
    splits = splits_for(partitioner)
    assert [s.partition_id for s in splits] == list(range(CLIENTS))
    every = np.concatenate(partitions(splits))
    assert len(every) == len(np.unique(every)) == N  # disjoint (train vs test too) and complete
    for s in splits:
        assert s.train_idx.dtype == np.int64 and (np.diff(s.train_idx) > 0).all()
        assert len(s.test_idx) == min(max(round(0.2 * (len(s.train_idx) + len(s.test_idx))), 1), 999)


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_partitions_are_reproducible_and_depend_on_the_seed(partitioner: str) -> None:
    first, again, other = splits_for(partitioner, 1), splits_for(partitioner, 1), splits_for(partitioner, 2)
    assert all(np.array_equal(a.train_idx, b.train_idx) for a, b in zip(first, again, strict=True))
    assert all(np.array_equal(a.test_idx, b.test_idx) for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a.train_idx, b.train_idx) for a, b in zip(first, other, strict=True))


def test_local_test_split_is_held_out_per_partition() -> None:
    splits = splits_for("iid", test_fraction=0.3)
    assert all((len(s.train_idx), len(s.test_idx)) == (70, 30) for s in splits)
    single = make_client_splits(LABELS[:2], DataConfig(partitioner="iid", min_partition_size=0), 2, 0)
    assert [(len(s.train_idx), len(s.test_idx)) for s in single] == [(1, 0), (1, 0)]  # nothing to hold out


def test_iid_is_label_balanced_even_on_sorted_labels() -> None:
    sorted_labels = np.sort(LABELS)
    for part in partitions(splits_for("iid", labels=sorted_labels)):
        assert len(part) == 100 and np.bincount(sorted_labels[part], minlength=10).min() >= 3


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_near_uniform() -> None:
    skewed = [
        top2_share(LABELS[p]) for p in partitions(splits_for("dirichlet", alpha=0.05, min_partition_size=0))
    ]
    uniform = [top2_share(LABELS[p]) for p in partitions(splits_for("dirichlet", alpha=1000.0))]
    assert np.median(skewed) > 0.7  # most clients are dominated by two classes
    assert max(uniform) < 0.35  # 0.2 would be exactly uniform


def test_dirichlet_respects_the_minimum_size() -> None:
    sizes = [len(p) for p in partitions(splits_for("dirichlet", alpha=0.5, min_partition_size=40))]
    assert min(sizes) >= 40 and len(set(sizes)) > 1


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_gives_exactly_k_classes_per_client(k: int) -> None:
    splits = splits_for("pathological", classes_per_client=k)
    for pid, part in enumerate(partitions(splits)):
        # "deterministic" assignment: client i holds classes i .. i+k-1 (mod 10)
        assert set(np.unique(LABELS[part]).tolist()) == {(pid + j) % 10 for j in range(k)}
        assert abs(len(part) - 100) <= 2  # each class is split evenly among the k clients holding it


def test_shard_gives_label_sorted_shards_and_leaves_out_the_remainder() -> None:
    labels = np.concatenate([LABELS, [9, 9, 9]])  # 1003 samples: 20 shards of 50, 3 samples left out
    splits = make_client_splits(labels, DataConfig(partitioner="shard", shards_per_client=2), CLIENTS, 0)
    parts = partitions(splits)
    assert [len(p) for p in parts] == [100] * CLIENTS
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_quantity_skews_sizes_but_keeps_labels_iid() -> None:
    labels = np.sort(np.arange(10000) % 10)  # sorted: contiguous size ranges must not mean label skew
    cfg = DataConfig(partitioner="quantity", alpha=0.5, min_partition_size=25)
    parts = partitions(make_client_splits(labels, cfg, CLIENTS, 0))
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 10000 and min(sizes) >= 25 and max(sizes) > 4 * min(sizes)
    for part in (p for p in parts if len(p) >= 500):
        assert np.abs(np.bincount(labels[part], minlength=10) / len(part) - 0.1).max() < 0.05


def test_impossible_minimum_size_fails_fast_with_the_numbers() -> None:
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"data\.min_partition_size: 101 samples x 10 clients = 1010 > 1000"):
        splits_for("dirichlet", min_partition_size=101)
    assert time.perf_counter() - start < 1


def test_unreachable_dirichlet_minimum_names_alpha() -> None:
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"data\.alpha: Dirichlet\(alpha=0\.01\) over 10 clients") as info:
        splits_for("dirichlet", alpha=0.01, min_partition_size=90)
    assert "\n" not in str(info.value) and "min_partition_size=90" in str(info.value)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize(
    ("partitioner", "kw", "clients", "message"),
    [
        ("iid", {}, N + 1, r"federation\.clients: 1001 clients but only 1000 training samples"),
        ("iid", {"min_partition_size": 101}, CLIENTS, r"data\.min_partition_size: 101 samples"),
        ("pathological", {"classes_per_client": 11}, CLIENTS, r"data\.classes_per_client: 11 > 10 classes"),
        ("shard", {"shards_per_client": 101}, CLIENTS, r"data\.shards_per_client: 101 x 10 clients = 1010"),
        ("quantity", {"min_partition_size": 0}, N + 1, r"federation\.clients"),
    ],
)
def test_infeasible_requests_name_the_key(partitioner: str, kw: dict, clients: int, message: str) -> None:
    with pytest.raises(DataError, match=message):
        make_client_splits(LABELS, DataConfig(partitioner=partitioner, **kw), clients, 0)


def test_subsample_is_seeded_sorted_and_zero_keeps_all() -> None:
    assert np.array_equal(subsample(50, 0, 0), np.arange(50))
    assert np.array_equal(subsample(50, 80, 0), np.arange(50))
    picked = subsample(50, 10, 1)
    assert len(np.unique(picked)) == 10 and (np.diff(picked) > 0).all() and picked.max() < 50
    assert np.array_equal(picked, subsample(50, 10, 1)) and not np.array_equal(picked, subsample(50, 10, 2))


def test_partition_report_has_the_counts_and_a_plot(tmp_path: Path) -> None:
    splits = splits_for("dirichlet", alpha=0.3)
    names = [f"class {c}" for c in range(10)]
    write_partition_report(tmp_path, splits, LABELS, 10, partitioner="dirichlet", class_names=names)
    report = json.loads((tmp_path / "partition.json").read_text())
    assert (report["num_clients"], report["partitioner"], report["num_classes"]) == (CLIENTS, "dirichlet", 10)
    assert report["class_names"] == names
    for entry, split in zip(report["clients"], splits, strict=True):
        part = np.concatenate([split.train_idx, split.test_idx])
        assert entry["partition_id"] == split.partition_id
        assert (entry["train_size"], entry["test_size"]) == (len(split.train_idx), len(split.test_idx))
        assert entry["class_counts"] == np.bincount(LABELS[part], minlength=10).tolist()
        assert entry["test_class_counts"] == np.bincount(LABELS[split.test_idx], minlength=10).tolist()
    png = (tmp_path / "partition.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_pooled_data_partitions_train_and_test_and_tests_on_the_local_test_splits() -> None:
    """PFLlib pools train and test; the global test set is then the clients' local test splits, no overlap."""
    import torch

    from fedlayer.config import Config
    from fedlayer.data import TensorData
    from fedlayer.experiment import partitioned

    def data(n: int, offset: int) -> TensorData:  # x encodes the sample's identity
        return TensorData(torch.arange(offset, offset + n).float().view(n, 1, 1, 1), torch.arange(n) % 10, 10)

    cfg = Config()
    cfg.data.pool, cfg.federation.clients = "train+test", 4
    fed = partitioned(data(300, 0), data(100, 1000), cfg)
    assert len(fed.train) == 400
    trained = {int(v) for s in fed.splits for v in fed.train.x[s.train_idx].flatten()}
    tested = {int(v) for v in fed.test.x.flatten()}
    assert tested == {int(v) for s in fed.splits for v in fed.train.x[s.test_idx].flatten()}
    assert not trained & tested and len(trained | tested) == 400
    assert any(v >= 1000 for v in trained)  # the dataset's test images are client data now
    cfg.data.pool = "train"
    separate = partitioned(data(300, 0), data(100, 1000), cfg)
    assert len(separate.train) == 300
    assert {int(v) for v in separate.test.x.flatten()} == set(range(1000, 1100))


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_partitions_are_what_flwr_datasets_load_partition_gives(partitioner: str) -> None:
    """Read at once from the partitioner (10,000 clients in seconds) = ``load_partition`` per client."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    p = partition_module
    cfg = DataConfig(partitioner=partitioner, min_partition_size=0)
    order = np.random.default_rng(3).permutation(N)
    reference = IidPartitioner(CLIENTS) if partitioner == "iid" else p._partitioner(LABELS, cfg, CLIENTS, 3)
    reference.dataset = datasets.Dataset.from_dict({p.LABEL: LABELS[order], p.INDEX: order})
    expected = [p._indices(reference.load_partition(pid)) for pid in range(CLIENTS)]
    fast = p._partition(LABELS, cfg, CLIENTS, 3)
    assert all(np.array_equal(a, b) for a, b in zip(fast, expected, strict=True))  # order included


def test_empty_dirichlet_clients_are_an_error_naming_the_keys_unless_the_minimum_is_zero() -> None:
    """alpha = 0.01: each class goes (almost) whole to one client, so 20 clients cannot all get data."""
    cfg = DataConfig(partitioner="dirichlet", alpha=0.01, min_partition_size=1)
    with pytest.raises(DataError, match=r"data\.alpha: .*data\.min_partition_size=1.*set it to 0") as info:
        make_client_splits(LABELS, cfg, 20, 0)
    assert "\n" not in str(info.value)
    cfg.min_partition_size = 0
    splits = make_client_splits(LABELS, cfg, 20, 0)
    empty = empty_partitions(splits)
    assert 0 < len(empty) < 20
    for s in splits:
        assert (s.partition_id in empty) == (len(s.train_idx) == 0 or len(s.test_idx) == 0)


def test_ten_thousand_clients_without_enough_data_fail_with_the_key() -> None:
    labels = np.arange(60_000) % 10
    with pytest.raises(
        DataError, match=r"data\.min_partition_size: 10 samples x 10000 clients = 100000 > 60000"
    ):
        make_client_splits(labels, DataConfig(partitioner="dirichlet", min_partition_size=10), 10_000, 0)
    # Feasible by count, not by Dirichlet draws: flwr-datasets gives up after 11 draws (1,000 clients keep
    # the test short; 10,000 take ~30 s here).
    with pytest.raises(DataError, match=r"data\.alpha: Dirichlet\(alpha=0\.3\) over 1000 clients"):
        make_client_splits(labels[:6000], DataConfig(partitioner="dirichlet", min_partition_size=3), 1000, 0)


def test_many_clients_get_a_summary_plot_and_the_empty_ones_are_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_bars(*args: object) -> None:
        raise AssertionError("one bar per client drawn for many clients")

    monkeypatch.setattr(partition_module, "partition_figure", no_bars)
    clients = BAR_PLOT_CLIENTS + 100
    labels = np.random.default_rng(0).permutation(np.arange(3000) % 10)
    cfg = DataConfig(partitioner="dirichlet", alpha=0.1, min_partition_size=0)
    splits = make_client_splits(labels, cfg, clients, 0)
    write_partition_report(tmp_path, splits, labels, 10, partitioner="dirichlet")
    report = json.loads((tmp_path / "partition.json").read_text())
    assert len(report["clients"]) == clients
    assert report["empty_partitions"] == empty_partitions(splits) != []
    png = (tmp_path / "partition.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_grouped_pathological_is_pfllibs_pat_partition() -> None:
    """20 clients x 2 classes of 10: clients 4g .. 4g+3 share classes 2g, 2g+1 (PFLlib's 'pat'); every sample
    is used once; sizes are PFLlib's unbalanced draw (each of the first 3 clients of a class gets at least a
    tenth of an even share and less than an even share, 50), seeded."""
    labels = np.arange(2000) % 10  # 200 per class
    parts = partition_module.grouped_pathological(labels, 2, 20, seed=0)
    for client, part in enumerate(parts):
        group = client // 4
        assert set(labels[part]) == {2 * group, 2 * group + 1}, client
    assert sorted(np.concatenate(parts)) == list(range(2000))
    for c in range(10):
        sizes = [int((labels[p] == c).sum()) for p in parts if (labels[p] == c).any()]
        assert len(sizes) == 4 and all(5 <= s < 50 for s in sizes[:3]) and sum(sizes) == 200
    assert len({len(p) for p in parts}) > 1  # unbalanced
    again = partition_module.grouped_pathological(labels, 2, 20, seed=0)
    other = partition_module.grouped_pathological(labels, 2, 20, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_grouped_pathological_through_the_config_and_its_infeasible_request() -> None:
    splits = make_client_splits(
        LABELS,
        DataConfig(partitioner="pathological", class_assignment="grouped", min_partition_size=0),
        10,
        0,
    )
    assert [sorted(set(LABELS[p])) for p in partitions(splits)] == [
        [c // 2 * 2, c // 2 * 2 + 1] for c in range(10)
    ]
    with pytest.raises(DataError, match=r"data.classes_per_client: .* 7 x 2 is not a multiple of 10"):
        make_client_splits(LABELS, DataConfig(partitioner="pathological", class_assignment="grouped"), 7, 0)
