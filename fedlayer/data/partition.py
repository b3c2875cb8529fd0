"""Client partitions made by flwr-datasets partitioners on in-memory labels, and a partition report."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlayer.config import PARTITIONERS, DataConfig
from fedlayer.data.sources import DataError
from fedlayer.run.atomic import save_figure, write_atomic
from fedlayer.run.files import PARTITION, PARTITION_PLOT

# datasets / flwr-datasets are imported where used: TensorData users (GPU benchmarks without Flower
# installed, client processes) should not pay for or need them.
if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner
    from matplotlib.figure import Figure, SubFigure

MAX_LEGEND_CLASSES = 20  # more classes get a colour bar of the class index
MAX_TICKED_CLIENTS = 40  # more clients get ticks at round numbers only
# Beyond this many clients one bar per client is unreadable and slow: summary statistics instead.
BAR_PLOT_CLIENTS = 200
LABEL, INDEX = "label", "idx"  # dataset columns: the label, and the sample's index into the training set


@dataclass(frozen=True)
class ClientSplit:
    """One client's share of the training set.

    Attributes
    ----------
    partition_id : int
        The client's partition (0 .. num_clients - 1).
    train_idx : np.ndarray
        Sorted indices into the training ``TensorData`` the client trains on.
    test_idx : np.ndarray
        Sorted indices of its local test split, held out from the same partition.
    """

    partition_id: int
    train_idx: np.ndarray
    test_idx: np.ndarray


def subsample(n: int, k: int, seed: int) -> np.ndarray:
    """Seeded sorted subset of ``range(n)`` of size ``k``; ``k == 0`` (or ``k >= n``) keeps all."""
    if k <= 0 or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def make_client_splits(labels: np.ndarray, cfg: DataConfig, num_clients: int, seed: int) -> list[ClientSplit]:
    """Partition the training set among clients and hold out each client's local test split.

    Parameters
    ----------
    labels : np.ndarray
        Labels of the training set (N,).
    cfg : DataConfig
        ``partitioner`` and its parameters: iid; dirichlet (``alpha``, ``min_partition_size``); pathological
        (``classes_per_client``: client i gets classes i .. i+k-1 mod C); shard (``shards_per_client``
        label-sorted shards, the remainder of N is left out); quantity (IID labels, client sizes
        ``min_partition_size`` + a Dirichlet(``alpha``) share of the rest); ``test_fraction``.
    num_clients : int
        Number of partitions.
    seed : int
        Seeds the partitioner and, with the partition id, each local train/test split.

    Raises
    ------
    DataError
        If the request is infeasible (too many clients, a minimum size that cannot be met, ...).
    """
    labels = np.asarray(labels, dtype=np.int64)
    _precheck(labels, cfg, num_clients)
    parts = _partition(labels, cfg, num_clients, seed)
    for pid, part in enumerate(parts):
        if len(part) < cfg.min_partition_size:
            raise DataError(
                f"data.min_partition_size: the {cfg.partitioner} partitioner gave client {pid} only "
                f"{len(part)} samples (< {cfg.min_partition_size}); lower it or federation.clients"
                f"={num_clients}"
            )
    return [_local_split(pid, part, cfg.test_fraction, seed) for pid, part in enumerate(parts)]


def _precheck(labels: np.ndarray, cfg: DataConfig, num_clients: int) -> None:
    """Reject impossible requests before flwr-datasets retries or fails with a multi-line message."""
    n = len(labels)
    if num_clients > n:
        hint = f" (data.max_samples={cfg.max_samples})" if cfg.max_samples else ""
        raise DataError(f"federation.clients: {num_clients} clients but only {n} training samples{hint}")
    floor = max(cfg.min_partition_size, 1 if cfg.partitioner == "quantity" else 0)
    if num_clients * floor > n:
        raise DataError(
            f"data.min_partition_size: {floor} samples x {num_clients} clients = {num_clients * floor} "
            f"> {n} training samples; lower data.min_partition_size or federation.clients"
        )
    present = len(np.unique(labels))
    if cfg.partitioner == "pathological" and cfg.classes_per_client > present:
        raise DataError(
            f"data.classes_per_client: {cfg.classes_per_client} > {present} classes in the training data"
        )
    grouped = cfg.partitioner == "pathological" and cfg.class_assignment == "grouped"
    if grouped and (num_clients * cfg.classes_per_client) % present:
        raise DataError(
            f"data.classes_per_client: class_assignment = 'grouped' gives each of the {present} classes to "
            f"clients x classes_per_client / {present} clients; {num_clients} x {cfg.classes_per_client} is "
            f"not a multiple of {present}"
        )
    shards = num_clients * cfg.shards_per_client
    if cfg.partitioner == "shard" and shards > n:
        raise DataError(
            f"data.shards_per_client: {cfg.shards_per_client} x {num_clients} clients = {shards} shards "
            f"> {n} training samples"
        )


def _partitioner(labels: np.ndarray, cfg: DataConfig, num_clients: int, seed: int) -> Partitioner:
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
        SizePartitioner,
    )

    name = cfg.partitioner
    if name == "dirichlet":
        return DirichletPartitioner(
            num_clients,
            LABEL,
            cfg.alpha,
            cfg.min_partition_size,
            self_balancing=cfg.self_balancing,
            seed=seed,
        )
    if name == "pathological":
        # "deterministic" uses every class equally often (when clients x k >= classes), so client sizes
        # stay balanced; "random" can leave classes unused and pile others onto many clients.
        return PathologicalPartitioner(
            num_clients, LABEL, cfg.classes_per_client, class_assignment_mode="deterministic", seed=seed
        )
    if name == "shard":
        return ShardPartitioner(num_clients, LABEL, num_shards_per_partition=cfg.shards_per_client, seed=seed)
    if name == "quantity":
        return SizePartitioner(_quantity_sizes(len(labels), cfg, num_clients, seed))
    raise DataError(f"data.partitioner: {name!r} is not allowed; choose one of: {', '.join(PARTITIONERS)}")


def _quantity_sizes(n: int, cfg: DataConfig, num_clients: int, seed: int) -> list[int]:
    """Every client gets the minimum size, the rest is split by a Dirichlet(alpha) share per client."""
    floor = max(cfg.min_partition_size, 1)  # SizePartitioner rejects empty partitions
    rng = np.random.default_rng([seed, num_clients])
    share = rng.dirichlet(np.full(num_clients, cfg.alpha))
    extra = rng.multinomial(n - num_clients * floor, share / share.sum())
    return [int(s) for s in floor + extra]  # SizePartitioner wants Python ints


def grouped_pathological(
    labels: np.ndarray, classes_per_client: int, num_clients: int, seed: int
) -> list[np.ndarray]:
    """PFLlib's 'pat' partition (``dataset_utils.separate_data``, unbalanced): class c, in label order, goes
    to the first clients x k / C clients still short of k classes; its samples are split among them in sizes
    drawn uniformly from [n_per / 10, n_per) for all but the last, which gets the rest (n_per: the class's
    samples / its clients). Sample indices per client, class by class."""
    rng = np.random.default_rng([seed, 0x9A7])
    classes = np.unique(labels)
    per_class = num_clients * classes_per_client // len(classes)
    short = [classes_per_client] * num_clients
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
        chosen = [client for client in range(num_clients) if short[client] > 0][:per_class]
        samples = rng.permutation(np.flatnonzero(labels == c))
        per = len(samples) / len(chosen)
        sizes = rng.integers(int(max(per / 10, 1)), max(int(per), 2), len(chosen) - 1)
        for client, chunk in zip(chosen, np.split(samples, np.cumsum(sizes)), strict=True):
            parts[client].append(chunk)
            short[client] -= 1
    return [np.concatenate(p) for p in parts]


def _partition(labels: np.ndarray, cfg: DataConfig, num_clients: int, seed: int) -> list[np.ndarray]:
    if cfg.partitioner == "pathological" and cfg.class_assignment == "grouped":
        return grouped_pathological(labels, cfg.classes_per_client, num_clients, seed)
    # Rows are shuffled first: IID and SizePartitioner take contiguous ranges of the dataset.
    order = np.random.default_rng(seed).permutation(len(labels))
    if cfg.partitioner == "iid":
        # IidPartitioner's contiguous shards (Dataset.shard) are np.array_split's (tested): no Dataset needed
        return np.array_split(order, num_clients)
    import datasets

    partitioner = _partitioner(labels, cfg, num_clients, seed)
    # arrow format: the partitioners read the label column with np.asarray, which is slow on a lazy Column.
    shuffled = datasets.Dataset.from_dict({LABEL: labels[order], INDEX: order})
    partitioner.dataset = shuffled.with_format("arrow")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one warning per Dirichlet retry; failure becomes one DataError
            return _assignment(partitioner, num_clients)
    except ValueError as err:
        raise _explain(err, cfg, len(labels), num_clients) from None


def _assignment(partitioner: Partitioner, num_clients: int) -> list[np.ndarray]:
    """Each partition's sample indices, in the order ``load_partition`` returns them.

    ``load_partition`` builds a ``Dataset`` per call (~8 ms, 80 s for 10,000 clients); the partitioners
    assign every row on the first call and keep the table of rows it selects (a test checks them equal).
    """
    first = _indices(partitioner.load_partition(0))
    table = getattr(partitioner, "_partition_id_to_indices", None)
    if not isinstance(table, dict) or len(table) != num_clients:
        return [first] + [_indices(partitioner.load_partition(pid)) for pid in range(1, num_clients)]
    index = _indices(partitioner.dataset)  # the table's rows are of this dataset (ShardPartitioner sorts it)
    return [index[np.asarray(table[pid], dtype=np.int64)] for pid in range(num_clients)]


def _indices(partition: datasets.Dataset) -> np.ndarray:
    return np.asarray(partition.with_format("numpy")[:][INDEX], dtype=np.int64)  # [:] avoids a lazy Column


def _explain(err: ValueError, cfg: DataConfig, n: int, num_clients: int) -> DataError:
    if cfg.partitioner == "dirichlet" and "max number of attempts" in str(err):
        return DataError(
            f"data.alpha: Dirichlet(alpha={cfg.alpha}) over {num_clients} clients and {n} samples left "
            f"a client below data.min_partition_size={cfg.min_partition_size} in 11 draws; "
            "raise data.alpha, lower data.min_partition_size, or set it to 0 to leave clients without data "
            "out of the federation"
        )
    reason = " ".join(str(err).split())
    return DataError(
        f"data.partitioner: {cfg.partitioner} cannot split {n} samples into {num_clients} clients: {reason}"
    )


def empty_partitions(splits: list[ClientSplit]) -> list[int]:
    """Partitions without a training or a local test sample: they can neither train nor be evaluated."""
    return [s.partition_id for s in splits if len(s.train_idx) == 0 or len(s.test_idx) == 0]


def _local_split(pid: int, part: np.ndarray, test_fraction: float, seed: int) -> ClientSplit:
    shuffled = np.random.default_rng([seed, pid]).permutation(part)
    n = len(part)
    # At least one sample on each side when possible: a client needs data to train and to be evaluated.
    n_test = 0 if n < 2 else min(max(round(n * test_fraction), 1), n - 1)
    return ClientSplit(pid, np.sort(shuffled[n_test:]), np.sort(shuffled[:n_test]))


def write_partition_report(
    run_dir: Path,
    splits: list[ClientSplit],
    labels: np.ndarray,
    num_classes: int,
    *,
    partitioner: str | None = None,
    class_names: Sequence[str] = (),
    client_domains: Sequence[int] | None = None,
    feature_shift: Mapping[str, Any] | None = None,
) -> None:
    """Write ``partition.json`` (per-client sizes and class counts) and ``partition.png`` into ``run_dir``.

    Parameters
    ----------
    run_dir : Path
        Existing output directory.
    splits : list[ClientSplit]
        The clients' splits, as made by :func:`make_client_splits`.
    labels : np.ndarray
        Labels of the training set the splits index into.
    num_classes : int
        Number of classes (the length of every ``class_counts`` list).
    partitioner : str | None
        Name recorded in the JSON (e.g. ``cfg.data.partitioner``).
    class_names : Sequence[str]
        The classes' names in label order (``TensorData.classes``), recorded and shown in the plot's legend;
        empty: classes are shown by index.
    client_domains : Sequence[int] | None
        Feature shift: each client's domain, recorded per client as ``domain``.
    feature_shift : Mapping[str, Any] | None
        Feature shift: the family, domain names, counts and sample images (``Domains.report``), recorded as
        ``feature_shift`` and shown in the plot, one sample image per domain.
    """
    labels = np.asarray(labels, dtype=np.int64)
    run_dir = Path(run_dir)
    clients = [_client_entry(s, labels, num_classes) for s in splits]
    if client_domains is not None:
        clients = [c | {"domain": int(k)} for c, k in zip(clients, client_domains, strict=True)]
    head: dict[str, object] = {
        "num_clients": len(splits),
        "partitioner": partitioner,
        "num_classes": num_classes,
    }
    if class_names:
        head["class_names"] = list(class_names)
    if empty := empty_partitions(splits):
        head["empty_partitions"] = empty
    if feature_shift is not None:
        head["feature_shift"] = dict(feature_shift)
    # One client per line: readable, and still small for hundreds of clients x 100 classes.
    body = ",\n".join(f"    {json.dumps(c)}" for c in clients)
    text = json.dumps(head, indent=2)[:-2] + f',\n  "clients": [\n{body}\n  ]\n}}\n'
    write_atomic(run_dir / PARTITION, text)
    save_figure(partition_plot(head | {"clients": clients}), run_dir / PARTITION_PLOT, dpi=110)


def partition_plot(report: Mapping[str, Any], class_names: Sequence[str] = ()) -> Figure:
    """The plot of a ``partition.json`` object: :func:`partition_figure` up to ``BAR_PLOT_CLIENTS``
    clients, :func:`partition_summary_figure` beyond; with a feature shift, a row of one sample image per
    domain below."""
    draw = partition_figure if len(report["clients"]) <= BAR_PLOT_CLIENTS else partition_summary_figure
    if "feature_shift" not in report:
        return draw(report, class_names)
    from matplotlib.figure import Figure

    shift = report["feature_shift"]
    width, height = _figsize(report)
    fig = Figure(figsize=(max(width, 1.6 * len(shift["names"])), height + 2.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[height, 2.2])  # type: ignore[misc]
    draw(report, class_names, top)
    _domain_samples(bottom, shift)
    return fig


def _figsize(report: Mapping[str, Any]) -> tuple[float, float]:
    clients = len(report["clients"])
    if clients > BAR_PLOT_CLIENTS:
        return 15.0, 4.5
    return min(max(6.0, 0.3 * clients), 24.0) + 2.0, 4.5


def _domain_samples(fig: Figure | SubFigure, shift: Mapping[str, Any]) -> None:
    """One sample image per domain, titled with its name and how many clients hold it."""
    axes = fig.subplots(1, len(shift["names"]), squeeze=False)[0]
    channels, *size = shift["sample_shape"]
    for ax, name, clients, hexed in zip(
        axes, shift["names"], shift["clients_per_domain"], shift["samples"], strict=True
    ):
        ax.set_axis_off()
        ax.set_title(f"{name}\n{clients} client{'s' * (clients != 1)}", fontsize=8)
        if hexed:
            image = np.frombuffer(bytes.fromhex(hexed), dtype=np.uint8).reshape(channels, *size)
            ax.imshow(image.transpose(1, 2, 0).squeeze(), cmap="gray", vmin=0, vmax=255)
    fig.suptitle(
        f"Feature shift: {shift['kind']}, severity {shift['severity']:g}; a training image of each domain "
        f"(global test images per domain: {', '.join(map(str, shift['global_test_per_domain']))})",
        fontsize=9,
    )


def _client_entry(split: ClientSplit, labels: np.ndarray, num_classes: int) -> dict[str, object]:
    def counts(idx: np.ndarray) -> list[int]:
        return [int(c) for c in np.bincount(labels[idx], minlength=num_classes)]

    return {
        "partition_id": split.partition_id,
        "train_size": len(split.train_idx),
        "test_size": len(split.test_idx),
        "class_counts": counts(np.concatenate([split.train_idx, split.test_idx])),  # the whole partition
        "test_class_counts": counts(split.test_idx),
    }


def partition_figure(
    report: Mapping[str, Any], class_names: Sequence[str] = (), fig: Figure | SubFigure | None = None
) -> Figure:
    """Stacked class counts per client from a ``partition.json`` object.

    Classes are named by ``class_names``, else by the report's ``class_names``, else by index; more than
    ``MAX_LEGEND_CLASSES`` classes get a colour bar of the class index instead of a legend. Drawn into
    ``fig`` when given (a subfigure of a larger plot).
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry involved
    from matplotlib.ticker import MaxNLocator

    counts = np.array([client["class_counts"] for client in report["clients"]]).reshape(
        len(report["clients"]), -1
    )
    names = list(class_names or report.get("class_names") or range(counts.shape[1]))
    clients, classes = counts.shape
    cmap = colormaps["tab10" if classes <= 10 else "tab20" if classes <= 20 else "viridis"]
    colours = [cmap(c if classes <= 20 else c / max(classes - 1, 1)) for c in range(classes)]
    fig = fig if fig is not None else Figure(figsize=_figsize(report), layout="constrained")
    ax = fig.subplots()
    bottoms = np.cumsum(counts, axis=1) - counts
    ids = np.array([client["partition_id"] for client in report["clients"]])
    for c in range(classes):
        ax.bar(ids, counts[:, c], bottom=bottoms[:, c], width=0.85, color=colours[c], label=str(names[c]))
    if clients <= MAX_TICKED_CLIENTS:
        ax.set_xticks(ids)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    partitioner = report.get("partitioner")
    ax.set(
        xlabel="client (partition id)",
        ylabel="samples (local train + test)",
        title=f"Labels per client: {clients} clients"
        + (f", {partitioner} partitioner" if partitioner else ""),
    )
    if classes <= MAX_LEGEND_CLASSES:
        ax.legend(title="class", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    else:
        fig.colorbar(ScalarMappable(Normalize(0, classes - 1), cmap), ax=ax, label="class index")
    return _root(fig)


def _root(fig: Figure | SubFigure) -> Figure:
    root = fig.get_figure(root=True)
    assert root is not None  # a subfigure always belongs to a figure
    return root


def partition_summary_figure(
    report: Mapping[str, Any], class_names: Sequence[str] = (), fig: Figure | SubFigure | None = None
) -> Figure:
    """Label-distribution statistics of many clients from a ``partition.json`` object: client sizes,
    classes per client, and per class the quantiles over clients of its share of a client's samples
    (drawn into ``fig`` when given)."""
    from matplotlib.figure import Figure

    counts = np.array([client["class_counts"] for client in report["clients"]]).reshape(
        len(report["clients"]), -1
    )
    names = [str(n) for n in (class_names or report.get("class_names") or range(counts.shape[1]))]
    sizes = counts.sum(axis=1)
    held = counts[sizes > 0]
    shares = held / held.sum(axis=1, keepdims=True)
    classes = np.arange(counts.shape[1])
    fig = fig if fig is not None else Figure(figsize=_figsize(report), layout="constrained")
    size_axis, kinds_axis, share_axis = fig.subplots(1, 3)
    size_axis.hist(sizes, bins=min(50, int(sizes.max()) + 1))
    size_axis.set(xlabel="samples per client (local train + test)", ylabel="clients", title="Client sizes")
    kinds_axis.hist((counts > 0).sum(axis=1), bins=np.arange(len(classes) + 2) - 0.5)
    kinds_axis.set(xlabel="classes held by a client", ylabel="clients", title="Classes per client")
    low, median, high = np.quantile(shares, [0.1, 0.5, 0.9], axis=0)
    share_axis.vlines(classes, low, high, linewidth=6, alpha=0.4, label="10-90 % of clients")
    share_axis.plot(classes, median, "o", label="median")
    share_axis.plot(classes, shares.mean(axis=0), "x", label="mean")
    share_axis.set(ylabel="share of a client's samples", ylim=(0, 1), title="Class shares")
    if len(classes) <= MAX_LEGEND_CLASSES:
        slanted = {"rotation": 45, "ha": "right"} if max(map(len, names)) > 2 else {}
        share_axis.set_xticks(classes, names, **slanted)
    share_axis.legend(loc="upper right")
    empty = len(counts) - len(held)
    partitioner = report.get("partitioner")
    fig.suptitle(
        f"Labels of {len(counts)} clients"
        + (f", {partitioner} partitioner" if partitioner else "")
        + (f" ({empty} without data)" if empty else "")
    )
    return _root(fig)
