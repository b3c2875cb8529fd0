"""Typed experiment configuration: TOML file + ``--set`` overrides, validated with one-line errors.

Every key is declared once, on the dataclasses below: its type (a ``Literal`` lists the allowed words), its
default, the numbers it allows (:class:`Range`) and a one-line meaning. Validation, the name tuples other
modules use (``DATASETS``, ``ORDERS``, ...) and the reference (``fedlayer config --reference``,
``docs/config.md``) are derived from these declarations. Only the standard library is imported here (and
``tomli_w`` to write TOML), so a config is validated before torch, Flower or Ray load.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Dataset = Literal["fashion_mnist", "mnist", "cifar10", "cifar100"]
Partitioner = Literal["iid", "dirichlet", "pathological", "shard", "quantity"]
ClassAssignment = Literal["cyclic", "grouped"]
Pool = Literal["train", "train+test"]
Normalization = Literal["dataset", "half"]
LabelShift = Literal["none", "permute"]
FeatureShiftKind = Literal["none", "rotate", "corrupt"]
DomainAssignment = Literal["round_robin", "random"]
ModelName = Literal["cnn", "pfllib_cnn", "mlp", "resnet18", "vgg11"]
Norm = Literal["none", "batch", "group"]
Device = Literal["auto", "cpu", "cuda"]
# Registries that import torch/flwr (strategies.ALGORITHMS, strategies.AGGREGATORS, models.MODEL_CLASSES)
# are checked against these in tests, so validating a config needs neither.
AlgorithmName = Literal[
    "fedavg",
    "fedprox",
    "fedper",
    "lgfedavg",
    "fedbn",
    "fedrep",
    "fedbabu",
    "ditto",
    "fedala",
    "fedrod",
    "feddbe",
    "fedcac",
    "fedcp",
    "gpfl",
    "local",
    "partial",
    "lmc",
]
AggregatorName = Literal[
    "fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"
]
Finetune = Literal["head", "final"]
LmcSource = Literal["clients", "server"]
LmcStatistic = Literal["mean", "max", "quantile"]
LmcCriterion = Literal["barrier", "mixing", "shadow"]
LmcNorm = Literal["follow", "decide"]
Pairs = Literal["clients", "global", "both"]
AnalysisData = Literal["global_test", "pair_train"]
Order = Literal["shallow", "deep", "random", "minimal"]
BnMode = Literal["interpolate", "reset"]

DATASETS: tuple[str, ...] = typing.get_args(Dataset)
PARTITIONERS: tuple[str, ...] = typing.get_args(Partitioner)
POOLS: tuple[str, ...] = typing.get_args(Pool)
NORMALIZATIONS: tuple[str, ...] = typing.get_args(Normalization)
LABEL_SHIFTS: tuple[str, ...] = typing.get_args(LabelShift)
FEATURE_SHIFTS: tuple[str, ...] = typing.get_args(FeatureShiftKind)
CORRUPT_DOMAINS = 6  # fedlayer/data/shift.py CORRUPTIONS: clean, noise, blur, contrast, invert, elastic
MODELS: tuple[str, ...] = typing.get_args(ModelName)
NORMS: tuple[str, ...] = typing.get_args(Norm)
DEVICES: tuple[str, ...] = typing.get_args(Device)
ALGORITHM_NAMES: tuple[str, ...] = typing.get_args(AlgorithmName)
AGGREGATOR_NAMES: tuple[str, ...] = typing.get_args(AggregatorName)
FINETUNES: tuple[str, ...] = typing.get_args(Finetune)
LMC_SOURCES: tuple[str, ...] = typing.get_args(LmcSource)
LMC_STATISTICS: tuple[str, ...] = typing.get_args(LmcStatistic)
LMC_CRITERIA: tuple[str, ...] = typing.get_args(LmcCriterion)
ORDERS: tuple[str, ...] = typing.get_args(Order)
BN_MODES: tuple[str, ...] = typing.get_args(BnMode)

DEFAULT_EXPERIMENT = "experiments/default.toml"  # `make run`, `fedlayer run` without CONFIG, `flwr run .`
DEFAULT_MIN_CLIENTS = 2  # Flower's default min_train_nodes
DEFAULT_PAIR_CLIENTS = 3  # clients analysed per round unless analysis.max_clients says otherwise (3 pairs)


class ConfigError(ValueError):
    """A bad input (config value, flag, file); the message is one line naming the key and what is allowed.

    Data and selector errors subclass it: the CLI exits with code 2 on any of them.
    """


@dataclass(frozen=True)
class Range:
    """The numbers a key allows: bounds, each open or closed; ``note`` explains a special value."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int | float):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            text = f"in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            text = f"{'>' if self.open_low else '>='} {self.low:g}"
        else:
            text = f"{'<' if self.open_high else '<='} {self.high:g}"
        return f"{text} ({self.note})" if self.note else text


POSITIVE = Range(0, open_low=True)
AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1, open_low=True)  # (0, 1]
MOMENTUM = Range(0, 1, open_high=True)  # [0, 1)


def setting(default: Any, meaning: str, allowed: Range | None = None) -> Any:
    """A config key: its default, a one-line meaning and, for numbers, the allowed range."""
    metadata = {"help": meaning, "range": allowed}
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    dataset: Dataset = setting("fashion_mnist", "torchvision dataset")
    root: str = setting(
        "",
        "directory of the dataset in torchvision's layout; empty: $FEDLAYER_DATA, the Debian package, "
        "then a download",
    )
    partitioner: Partitioner = setting(
        "dirichlet", "how the training pool is split among clients (flwr-datasets)"
    )
    alpha: float = setting(
        0.3, "dirichlet: label concentration; quantity: size concentration (smaller = more skew)", POSITIVE
    )
    min_partition_size: int = setting(
        10, "smallest client partition (dirichlet redraws until every client has it)", AT_LEAST_0
    )
    self_balancing: bool = setting(
        False, "dirichlet: stop giving a class to clients above N/clients samples (PFLlib)"
    )
    classes_per_client: int = setting(2, "pathological: classes per client", AT_LEAST_1)
    class_assignment: ClassAssignment = setting(
        "cyclic",
        "pathological: cyclic: client i gets classes i .. i+k-1 (mod C), each class split evenly among its "
        "clients (flwr-datasets); grouped: PFLlib's 'pat': each class in turn goes to the next "
        "clients x k / C clients still short of k classes (clients 0-3 share classes 0, 1 for 20 x 2 of 10), "
        "split in random sizes as PFLlib's unbalanced setting draws them",
    )
    shards_per_client: int = setting(2, "shard: label-sorted shards per client", AT_LEAST_1)
    test_fraction: float = setting(
        0.2, "share of each client's partition held out as its local test split", Range(0, 1, True, True)
    )
    max_samples: int = setting(
        0, "subsample the training pool to this many samples (seeded)", Range(0, note="0 = all")
    )
    max_test_samples: int = setting(0, "subsample the global test set (seeded)", Range(0, note="0 = all"))
    pool: Pool = setting(
        "train",
        "train: partition the training set, its test set is the global one; "
        "train+test: partition both (PFLlib), the global test set is the union of the local test splits",
    )
    normalize: Normalization = setting(
        "dataset", "dataset: its per-channel mean/std; half: mean 0.5, std 0.5 (PFLlib)"
    )
    label_shift: LabelShift = setting(
        "none",
        "permute: each client relabels its data by its own seeded permutation (concept shift); client 0 and "
        "the global test set keep the dataset's labels",
    )
    feature_shift: FeatureShiftKind = setting(
        "none",
        "each client's images (train and test) come from its own domain, transformed once when the partition "
        "is built: rotate (domain k turned by k x severity x 360/domains degrees) or corrupt (clean, noise, "
        "blur, contrast, invert, elastic); the global test set holds every domain: pool = train+test: the "
        "union of the local test splits, each in its client's domain; pool = train: test image j in domain "
        "j mod domains",
    )
    domains: int = setting(
        4, "feature_shift: number of domains (corrupt: at most 6); at most federation.clients", AT_LEAST_1
    )
    severity: float = setting(
        1.0, "feature_shift: strength of every domain's transform (0 = none, 1 = strongest)", Range(0, 1)
    )
    domain_assignment: DomainAssignment = setting(
        "round_robin",
        "feature_shift: client i gets domain i mod domains; random: a seeded shuffle of that assignment",
    )


@dataclass
class ModelConfig:
    name: ModelName = setting("cnn", "architecture (fedlayer/models.py)")
    norm: Norm = setting("none", "normalization layers of cnn, pfllib_cnn, resnet18, vgg11 (mlp: none only)")


@dataclass
class TrainConfig:
    epochs: int = setting(1, "local epochs per round", AT_LEAST_1)
    lr: float = setting(0.05, "client SGD learning rate", POSITIVE)
    momentum: float = setting(0.9, "client SGD momentum", MOMENTUM)
    weight_decay: float = setting(0.0, "client SGD weight decay", AT_LEAST_0)
    batch_size: int = setting(32, "local batch size", AT_LEAST_1)
    drop_last: bool = setting(False, "skip each epoch's last partial batch (PFLlib's loaders do)")
    evaluate_before: bool = setting(
        True, "personalized evaluation before local training (personalized_acc_before)"
    )
    evaluate_after: bool = setting(
        True, "personalized evaluation right after local training (personalized_acc_after)"
    )
    device: Device = setting("auto", "where clients train; auto = CUDA when present")


@dataclass
class FederationConfig:
    clients: int = setting(10, "virtual clients (SuperNodes), one partition each", AT_LEAST_1)
    rounds: int = setting(5, "federated rounds", AT_LEAST_1)
    fraction_train: float = setting(
        1.0, "share of the clients sampled to train each round (seeded)", FRACTION
    )
    fraction_evaluate: float = setting(
        1.0, "share of the clients sampled for personalized evaluation", FRACTION
    )
    evaluate_every: int = setting(
        1,
        "evaluate every N rounds (PFLlib's eval_gap): the clients' personalized evaluations (before and "
        "after training, and after aggregation) and the server's global one; the last round always",
        AT_LEAST_1,
    )
    min_train_clients: int = setting(
        0,
        "fewest clients a round needs, and valid updates it aggregates; at most federation.clients",
        Range(0, note=f"0 = min({DEFAULT_MIN_CLIENTS}, federation.clients)"),
    )
    client_cpus: float = setting(1.0, "Ray CPUs per client actor", POSITIVE)
    client_gpus: float = setting(
        0.0, "Ray GPU share per client actor (fractions let clients share a GPU)", AT_LEAST_0
    )
    client_app: str = setting(
        "fedlayer.client.app:app",
        "the ClientApp a simulation runs, as module:attribute (e.g. fedlayer's own behind Flower mods); "
        "deployments run pyproject.toml's [tool.flwr.app.components] clientapp",
    )
    ray_address: str = setting(
        "",
        'Ray cluster to join: "" = a private local Ray; "auto" or "HOST:PORT" of a running cluster\'s '
        "head (RAY_ADDRESS in the environment counts too)",
    )

    def evaluates(self, server_round: int) -> bool:
        """Whether round ``server_round`` is evaluated (every ``evaluate_every``-th, and the last)."""
        return server_round % self.evaluate_every == 0 or server_round >= self.rounds

    @property
    def min_clients(self) -> int:
        """``min_train_clients`` with 0 resolved to Flower's default, at most every client."""
        return self.min_train_clients or min(DEFAULT_MIN_CLIENTS, self.clients)


@dataclass
class StrategyConfig:
    name: AlgorithmName = setting(
        "fedavg", "algorithm: which blocks are shared, client recipe (strategies/algorithms.py)"
    )
    aggregator: AggregatorName = setting(
        "fedavg", "Flower strategy that aggregates the shared blocks (fedprox forces fedprox)"
    )
    shared: list[str] = setting(
        [], "partial: block patterns the server averages; lmc: the set before the first decision"
    )
    exclude: list[str] = setting([], "block patterns kept personal on top of the algorithm's")
    proximal_mu: float = setting(0.01, "fedprox: weight of the proximal term", AT_LEAST_0)
    head_epochs: int = setting(1, "fedrep: head epochs before the body epochs", AT_LEAST_0)
    finetune: Finetune = setting(
        "head",
        "fedbabu: head = fine-tune the head before every personalized evaluation; "
        "final = fine-tune the whole model after the last round (PFLlib)",
    )
    finetune_steps: int = setting(
        10, "fedbabu (finetune = head): head steps before each personalized evaluation", AT_LEAST_0
    )
    finetune_epochs: int = setting(
        10, "fedbabu (finetune = final): whole-model epochs after the last round", AT_LEAST_0
    )
    ditto_mu: float = setting(
        0.0,
        "ditto: weight of the pull of the personal model toward the global one (PFLlib's default mu = 0; "
        "the paper tunes it, e.g. 0.1-1)",
        AT_LEAST_0,
    )
    ditto_epochs: int = setting(
        1, "ditto: personal-model epochs per round (PFLlib's plocal_epochs)", AT_LEAST_1
    )
    ala_eta: float = setting(1.0, "fedala: learning rate of the mixing weights (PFLlib's eta)", POSITIVE)
    ala_rand_percent: int = setting(
        80,
        "fedala: percent of the local training data the weights learn on (PFLlib's rand_percent)",
        Range(1, 100),
    )
    ala_layer_idx: int = setting(
        2,
        "fedala: the last this many parameter tensors are mixed; the others take the global values "
        "(PFLlib's layer_idx)",
        AT_LEAST_1,
    )
    dbe_momentum: float = setting(
        0.1, "feddbe: momentum of the features' running mean (PFLlib's momentum)", Range(0, 1)
    )
    dbe_kl_weight: float = setting(
        0.0,
        "feddbe: weight of the pull of the running mean to the global mean (PFLlib's default kl_weight = 0; "
        "its scripts use e.g. 0.001-1)",
        AT_LEAST_0,
    )
    cac_tau: float = setting(
        0.5,
        "fedcac: share of each parameter tensor a client marks critical (PFLlib's tau, default 1.0 = all; "
        "FL-bench and the paper's code use 0.5)",
        Range(0, 1),
    )
    cac_beta: int = setting(
        170,
        "fedcac: rounds over which the collaboration threshold rises from the mean overlap to the maximum "
        "(PFLlib's beta, which has no usable default; FL-bench's 170)",
        AT_LEAST_1,
    )
    cp_lambda: float = setting(
        1.0,
        "fedcp: weight of the MMD between the features of the trained body and of the received body "
        "(PFLlib's lamda, default 1.0)",
        AT_LEAST_0,
    )
    gpfl_lambda: float = setting(
        1.0,
        "gpfl: weight of the distance of the generic features to their frozen class embeddings "
        "(PFLlib's lamda, default 1.0)",
        AT_LEAST_0,
    )
    gpfl_mu: float = setting(
        0.0,
        "gpfl: L2 weight decay on the category embedding and the conditional valve (PFLlib's mu, default 0)",
        AT_LEAST_0,
    )
    lmc_criterion: LmcCriterion = setting(
        "barrier",
        "lmc: what decides sharing: barrier = the cost of moving a block halfway to the server's value; "
        "mixing = per-block weights each client learns on held-out data; shadow = mixing for the lower "
        "blocks, and for the model's tail blocks a shadow copy in the other regime trained beside each one "
        "on the same batches, compared on held-out data (strategies/lmc.py)",
    )
    lmc_source: LmcSource = setting(
        "clients", "lmc: who measures the cost of sharing each block: clients on their data, or the analysis"
    )
    lmc_every: int = setting(1, "lmc: rounds between sharing decisions", AT_LEAST_1)
    lmc_samples: int = setting(
        128, "lmc: local training samples each client measures its costs on", AT_LEAST_1
    )
    lmc_statistic: LmcStatistic = setting(
        "mean", "lmc: cost over clients: mean (sample-weighted), max, quantile"
    )
    lmc_quantile: float = setting(0.9, "lmc (lmc_statistic = quantile): the quantile", Range(0, 1))
    lmc_threshold: float = setting(
        0.02, "lmc: share a block when its cost (loss increase, nats) is at most this", AT_LEAST_0
    )
    lmc_alpha: float = setting(
        0.5,
        "lmc: how far a block moves toward the server's value when its cost is measured (1 = replaced)",
        Range(0, 1, open_low=True),
    )
    lmc_share_fraction: float = setting(
        0.0,
        "lmc: share this fraction of blocks, the cheapest, instead",
        Range(0, 1, note="0 = use lmc_threshold"),
    )
    lmc_always: list[str] = setting([], "lmc: block patterns always shared")
    lmc_norm: LmcNorm = setting(
        "follow",
        "lmc: norm blocks (BatchNorm, LayerNorm, ...) follow the block they normalize (follow) or are "
        "decided by their own evidence like any other block (decide; FedBN's split becomes reachable; with "
        "mixing, their weights then also see the running statistics, by a finite difference)",
    )
    lmc_reshare: bool = setting(
        False,
        "lmc (barrier): a block that turned personal may be shared again when its cost falls (false: blocks "
        "only turn personal, and decision rounds send no full models; mixing always re-decides them)",
    )
    lmc_holdout: float = setting(
        0.1,
        "lmc (mixing): fraction of each client's training split held out (never trained on) to learn its "
        "mixing weights",
        Range(0, 0.5, open_low=True),
    )
    lmc_holdout_min: int = setting(
        32,
        "lmc (mixing): held-out samples at least (at most half of the client's training split)",
        AT_LEAST_1,
    )
    lmc_mix_steps: int = setting(
        5, "lmc (mixing): full-batch SGD steps on the held-out slice per round for the weights", AT_LEAST_0
    )
    lmc_mix_lr: float = setting(
        1.0, "lmc (mixing): learning rate of the weights (weight per nat of held-out loss)", POSITIVE
    )
    lmc_mix_train: bool = setting(
        True,
        "lmc (mixing): clients train and evaluate from their blocks mixed by the learned weights "
        "(FedALA-style); false: the weights are evidence only (shared blocks start from the server's value, "
        "personal ones from the client's own copy)",
    )
    lmc_finetune: int = setting(
        0,
        "lmc (mixing): after the last round each client fine-tunes its personalized model (every block) for "
        "this many epochs on its training part and keeps the result only if its held-out loss is lower; "
        "0: no fine-tuning",
        AT_LEAST_0,
    )
    lmc_weight_threshold: float = setting(
        0.5,
        "lmc (mixing): a block is shared while its clients' mean weight (sample-weighted) is at least this",
        Range(0, 1),
    )
    lmc_weight_margin: float = setting(
        0.1,
        "lmc (mixing): hysteresis: a shared block turns personal below threshold - margin, a personal one "
        "shared again at threshold + margin or above",
        Range(0, 0.5),
    )
    lmc_shadow_decay: float = setting(
        0.7,
        "lmc (shadow): the running evidence of a tail block is decay x itself + (1 - decay) x the round's "
        "held-out gain of sharing it (0: the last round alone)",
        Range(0, 1, open_high=True),
    )
    lmc_shadow_margin: float = setting(
        0.005,
        "lmc (shadow): hysteresis in nats of held-out loss: a shared tail block turns personal once its "
        "running gain of sharing is below -margin, a personal one shared again above +margin",
        AT_LEAST_0,
    )
    server_lr: float = setting(1.0, "fedavgm, fedadam, fedyogi, fedadagrad: server learning rate", POSITIVE)
    server_momentum: float = setting(0.9, "fedavgm: server momentum", MOMENTUM)
    trim_beta: float = setting(0.2, "fedtrimmedavg: share cut from each end", Range(0, 0.5, open_high=True))


@dataclass
class AnalysisConfig:
    every: int = setting(0, "rounds between layer-wise barrier analyses", Range(0, note="0 = off"))
    pairs: Pairs = setting(
        "clients", "clients: all pairs of analysed clients; global: each vs the aggregated model; both"
    )
    max_clients: int = setting(
        0,
        "clients analysed per round (the first sampled); otherwise 2 to federation.clients",
        Range(0, note=f"0 = up to {DEFAULT_PAIR_CLIENTS}"),
    )
    data: AnalysisData = setting(
        "global_test", "evaluation data: the global test set, or the pair's local training data"
    )
    samples: int = setting(
        300, "evaluation samples per pair (bench/RESULTS.md: precision vs 2,000)", AT_LEAST_1
    )
    alphas: list[float] = setting(
        [], "α grid: [] = midpoint only, else at least 2 distinct values", Range(0, 1)
    )
    cumulative: list[Order] = setting(
        [],
        "cumulative barriers, blocks added one by one: shallow first, deep first, seeded random, "
        "minimal (first 5 + last 5, then the middle)",
    )
    random_control: bool = setting(False, "also along a Gaussian direction of equal norm per block")
    bn: BnMode = setting(
        "interpolate", "BatchNorm statistics: interpolated like weights, or re-estimated on the data"
    )
    landscape: bool = setting(
        False, "per-block displacement norms, cosines, curvature and predicted barriers"
    )
    num_gpus: float = setting(
        0.0, "GPU share of the analysis Ray actor (left free beside the client actors')", AT_LEAST_0
    )
    num_cpus: float = setting(0.0, "CPUs of the analysis Ray actor", AT_LEAST_0)
    strict: bool = setting(False, "a failing analysis stops the run (else it is logged and training goes on)")

    @property
    def pair_clients(self) -> int:
        """How many of a round's sampled clients are analysed (at most those sampled)."""
        return self.max_clients or DEFAULT_PAIR_CLIENTS


@dataclass
class Config:
    seed: int = setting(0, "seeds partitions, the initial model, client sampling and batch order", AT_LEAST_0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


# ----------------------------------------------------------------------------- building and checking


def _fields(cls: Any) -> dict[str, tuple[Any, dataclasses.Field[Any]]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"list[{_type_name(typing.get_args(kind)[0])}]"
    if typing.get_origin(kind) is Literal:
        return "str"
    return str(kind.__name__)


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check ``value``'s type against the annotation ``kind``; ints are accepted for floats."""
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is Literal:
        kind = str
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    known = _fields(cls)
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name not in known:
            kind = "section" if isinstance(value, dict) else "key"
            raise ConfigError(f"{key}: unknown {kind}; allowed: {', '.join(known)}")
        kind_, _ = known[name]
        if dataclasses.is_dataclass(kind_):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a [{name}] section, got {value!r}")
            kwargs[name] = _build(kind_, value, f"{key}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(key, value, kind_)
    return cls(**kwargs)


def _not_allowed(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


def _check_value(key: str, value: Any, kind: Any, allowed: Range | None) -> None:
    """A value against its declaration: a Literal's words, finiteness of floats, the declared range."""
    origin = typing.get_origin(kind)
    if origin is list:
        for i, item in enumerate(value):
            _check_value(f"{key}[{i}]", item, typing.get_args(kind)[0], allowed)
    elif origin is Literal:
        if value not in typing.get_args(kind):
            raise _not_allowed(key, value, f"choose one of: {', '.join(typing.get_args(kind))}")
    elif isinstance(value, float) and not math.isfinite(value):
        raise _not_allowed(key, value, "must be a finite number")
    elif allowed is not None and value not in allowed:
        raise _not_allowed(key, value, f"must be {allowed}")


def _check_declared(obj: object, prefix: str = "") -> None:
    for name, (kind, spec) in _fields(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(kind):
            _check_declared(value, f"{prefix}{name}.")
        else:
            _check_value(f"{prefix}{name}", value, kind, spec.metadata.get("range"))


def validate(cfg: Config) -> None:
    """Every value against its declaration, then what involves several keys."""
    _check_declared(cfg)
    f, a, d = cfg.federation, cfg.analysis, cfg.data
    if d.feature_shift != "none" and d.domains > f.clients:
        raise _not_allowed("data.domains", d.domains, f"must be <= federation.clients={f.clients}")
    if d.feature_shift == "corrupt" and d.domains > CORRUPT_DOMAINS:
        raise _not_allowed(
            "data.domains", d.domains, f"must be <= {CORRUPT_DOMAINS} with data.feature_shift = 'corrupt'"
        )
    if f.min_train_clients > f.clients:
        raise _not_allowed(
            "federation.min_train_clients", f.min_train_clients, f"must be <= federation.clients={f.clients}"
        )
    if a.max_clients == 1 or (a.every > 0 and a.max_clients > f.clients):
        raise _not_allowed(
            "analysis.max_clients",
            a.max_clients,
            f"must be 0 (up to {DEFAULT_PAIR_CLIENTS}) or 2 to federation.clients={f.clients}",
        )
    s = cfg.strategy
    held_out = s.name == "lmc" and s.lmc_criterion in ("mixing", "shadow")
    if held_out and s.lmc_source != "clients":
        raise _not_allowed(
            "strategy.lmc_source",
            s.lmc_source,
            f"'clients' with strategy.lmc_criterion = {s.lmc_criterion!r}",
        )
    if s.lmc_finetune and not held_out:
        raise _not_allowed(
            "strategy.lmc_finetune",
            s.lmc_finetune,
            "0 unless strategy.name = 'lmc' with strategy.lmc_criterion = 'mixing' or 'shadow' (it needs "
            "held-out data)",
        )
    if s.name == "lmc" and s.lmc_criterion == "shadow" and s.lmc_every != 1:
        raise _not_allowed(
            "strategy.lmc_every",
            s.lmc_every,
            "1 with strategy.lmc_criterion = 'shadow' (the shadows of personal blocks restart from the "
            "server's average of them every round)",
        )
    if s.name == "lmc" and s.lmc_source == "server" and (a.every == 0 or s.lmc_every % a.every):
        raise _not_allowed(
            "strategy.lmc_source",
            s.lmc_source,
            "'clients' unless analysis.every > 0 divides strategy.lmc_every ('server' reads the analysis)",
        )
    if a.alphas and (len(a.alphas) < 2 or len(set(a.alphas)) != len(a.alphas)):
        raise _not_allowed(
            "analysis.alphas", a.alphas, "must be [] (midpoint only) or at least 2 distinct values"
        )


def check_gpus(cfg: Config, available: int, cpus: int) -> None:
    """The GPU shares a run asks for must fit the ``available`` GPUs of a machine with ``cpus`` CPUs.

    Not part of :func:`validate`: clients validate the same config on machines with other devices.
    Ray would wait forever for a share that does not fit: a client actor's, or the analysis actor's beside
    every client actor Ray can place (CPUs / ``client_cpus``, capped by the client GPU shares).
    """
    f, a = cfg.federation, cfg.analysis
    if f.client_gpus > available:
        gpus = f"must be <= {available} available GPU(s)" if available else "no CUDA device is available"
        raise _not_allowed("federation.client_gpus", f.client_gpus, gpus)
    if a.every == 0 or a.num_gpus == 0:
        return
    actors = int(cpus // f.client_cpus)
    if f.client_gpus > 0:
        actors = min(actors, int(available // f.client_gpus))
    free = available - actors * f.client_gpus
    if a.num_gpus > free + 1e-9:
        raise _not_allowed(
            "analysis.num_gpus",
            a.num_gpus,
            f"must be <= {free:g}: {available} available GPU(s) minus {actors} client actor(s) x "
            f"federation.client_gpus={f.client_gpus:g}",
        )


# ----------------------------------------------------------------------------- loading and writing


def parse_value(text: str) -> Any:
    """Parse the value of a ``--set key=value`` override as TOML, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        *sections, name = key.strip().split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {section} is not a section")
        node[name] = parse_value(text.strip())
    return raw


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; any reason it cannot be read is a one-line ConfigError naming it."""
    name = str(path)
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config: file {name!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config: {name!r} is a directory; give an experiment TOML file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config: {name!r} is not UTF-8 text (byte {err.start}); give a TOML file"
        ) from None
    except OSError as err:
        raise ConfigError(f"config: {name!r} cannot be read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config: {name} is not valid TOML ({err})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML experiment file (or the defaults), apply ``--set`` overrides and validate."""
    raw = read_toml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, list(overrides or [])))


def config_from_dict(raw: dict[str, Any]) -> Config:
    cfg: Config = _build(Config, raw, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The complete config as TOML (for ``config.resolved.toml`` and the ClientApp's messages)."""
    import tomli_w  # here: the analysis maths imports this module on GPU boxes that may lack it

    return tomli_w.dumps(to_dict(cfg))


# ----------------------------------------------------------------------------- reference


def _toml_value(value: Any) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value}, indent=0).removeprefix("v = ").strip()


def _allowed(kind: Any, allowed: Range | None) -> str:
    if typing.get_origin(kind) is list:
        return _allowed(typing.get_args(kind)[0], allowed)
    if typing.get_origin(kind) is Literal:
        return ", ".join(f"`{v}`" for v in typing.get_args(kind))
    if kind is bool:
        return "`true`, `false`"
    return str(allowed) if allowed is not None else ""


def reference_rows(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, allowed, meaning) of every key, sections after the top-level keys."""
    rows, sections = [], []
    defaults = cls()
    for name, (kind, spec) in _fields(cls).items():
        if dataclasses.is_dataclass(kind):
            sections.append((kind, f"{prefix}{name}."))
            continue
        value = _toml_value(getattr(defaults, name))
        rows.append(
            (
                f"{prefix}{name}",
                _type_name(kind),
                value,
                _allowed(kind, spec.metadata.get("range")),
                spec.metadata["help"],
            )
        )
    for kind, section in sections:
        rows += reference_rows(kind, section)  # type: ignore[arg-type]
    return rows


REFERENCE_INTRO = """\
# Configuration reference

Generated from the declarations in `fedlayer/config.py` by `fedlayer config --reference`; do not edit
(a test checks that this file is current).

An experiment is a TOML file: a top-level `seed` and the sections `[data]`, `[model]`, `[train]`,
`[federation]`, `[strategy]`, `[analysis]`. Every key is optional (its default is below);
`--set section.key=value` overrides one (the value is TOML: `--set "strategy.shared=['conv*']"`), and
`fedlayer config EXPERIMENT.toml --set ...` prints the complete resolved config. Floats must be finite.
A bad value exits with code 2 and one line naming the key and what is allowed.
"""


def reference_markdown() -> str:
    """Every key with its type, default, allowed values and meaning, as markdown (``docs/config.md``)."""
    lines = [REFERENCE_INTRO.rstrip()]
    section = None
    for key, kind, default, allowed, meaning in reference_rows():
        current = key.rpartition(".")[0]
        if current != section:
            section = current
            lines += ["", f"## [{section}]" if section else "## Top level", ""]
            lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        cells = (f"`{key}`", kind, f"`{default}`", allowed, meaning)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
