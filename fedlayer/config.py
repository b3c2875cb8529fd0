"""Typed experiment configuration: TOML file + ``--set`` overrides, validated with one-line errors."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100")
PARTITIONERS = ("iid", "dirichlet", "pathological", "shard", "quantity")
MODELS = ("cnn", "pfllib_cnn", "mlp", "resnet18", "vgg11")
NORMS = ("none", "batch", "group")
DEVICES = ("auto", "cpu", "cuda")
POOLS = ("train", "train+test")
NORMALIZATIONS = ("dataset", "half")
LABEL_SHIFTS = ("none", "permute")
FINETUNES = ("head", "final")
LMC_SOURCES = ("clients", "server")
LMC_STATISTICS = ("mean", "max", "quantile")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key and what is allowed."""


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    root: str = ""  # "" = look up $FEDLAYER_DATA, the Debian dataset path, then download
    partitioner: str = "dirichlet"
    alpha: float = 0.3  # Dirichlet concentration (dirichlet) / size concentration (quantity)
    min_partition_size: int = 10
    self_balancing: bool = False  # dirichlet: stop giving a class to clients above N/clients (PFLlib's rule)
    classes_per_client: int = 2  # pathological
    shards_per_client: int = 2  # shard
    test_fraction: float = 0.2  # of each client's partition, held out as its local test split
    max_samples: int = 0  # subsample the training set (seeded); 0 = all
    max_test_samples: int = 0  # subsample the global test set (seeded); 0 = all
    # "train": partition the training set, the test set is the server's global test set;
    # "train+test": pool both (PFLlib); the global test set is the union of the clients' local test splits
    pool: str = "train"
    normalize: str = "dataset"  # dataset: its per-channel mean/std; half: mean 0.5, std 0.5 (PFLlib)
    # none | permute: each client relabels its data by its own seeded permutation (concept shift); client 0
    # and the global test set keep the dataset's labels, so global accuracy is client 0's view
    label_shift: str = "none"


@dataclass
class ModelConfig:
    name: str = "cnn"
    norm: str = "none"  # resnet18 / vgg11: none | batch | group


@dataclass
class TrainConfig:
    epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    drop_last: bool = False  # skip each epoch's last partial batch (PFLlib's loaders do)
    evaluate_before: bool = True  # personalized evaluation before local training (personalized_acc_before)
    device: str = "auto"


@dataclass
class FederationConfig:
    clients: int = 10
    rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 2
    client_cpus: float = 1.0
    client_gpus: float = 0.0


@dataclass
class StrategyConfig:
    name: str = "fedavg"
    aggregator: str = "fedavg"
    shared: list[str] = field(default_factory=list)  # `partial`: block patterns that are averaged
    exclude: list[str] = field(default_factory=list)
    proximal_mu: float = 0.01  # fedprox
    head_epochs: int = 1  # fedrep
    finetune_steps: int = 10  # fedbabu (finetune = "head"): head steps before every personalized evaluation
    # fedbabu: "head" = the above; "final" = PFLlib's protocol: no fine-tuning during rounds, the whole model
    # fine-tuned for finetune_epochs after the last round (its evaluation is the last round's)
    finetune: str = "head"
    finetune_epochs: int = 10
    # lmc (barrier-guided sharing, strategies/sharing.py): `shared` is the set before the first decision
    lmc_source: str = "clients"  # clients: costs measured by clients on their data; server: analysis hook
    lmc_every: int = 1  # rounds between decisions (every, 2 x every, ... are decision rounds)
    lmc_samples: int = 256  # local training samples each client measures its costs on
    lmc_statistic: str = "mean"  # over clients: mean (sample-weighted) | max | quantile
    lmc_quantile: float = 0.9
    lmc_threshold: float = 0.05  # share a block when its cost (loss increase, nats) is <= this
    lmc_alpha: float = 0.5  # how far each block moves toward the server's value when measured (1 = replaced)
    lmc_share_fraction: float = 0.0  # > 0: share this fraction of blocks with the lowest cost instead
    lmc_always: list[str] = field(default_factory=list)  # block patterns always shared
    server_lr: float = 1.0  # fedavgm / fedadam
    server_momentum: float = 0.9  # fedavgm
    trim_beta: float = 0.2  # fedtrimmedavg


@dataclass
class AnalysisConfig:
    every: int = 0  # rounds between analyses; 0 = off
    pairs: str = "clients"  # clients | global | both
    max_clients: int = 4
    data: str = "global_test"  # global_test | pair_train
    samples: int = 2000
    alphas: list[float] = field(default_factory=list)  # [] = midpoint only
    cumulative: list[str] = field(default_factory=list)  # shallow | deep | random | minimal
    random_control: bool = False
    bn: str = "interpolate"  # interpolate | reset
    landscape: bool = False
    num_gpus: float = 0.0
    num_cpus: float = 0.0
    strict: bool = False


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check ``value`` against the annotation ``kind``; ints are accepted for floats."""
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(kind, type) and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
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
        kind_ = known[name]
        if dataclasses.is_dataclass(kind_):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a [{name}] section, got {value!r}")
            kwargs[name] = _build(kind_, value, f"{key}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(key, value, kind_)
    return cls(**kwargs)


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML experiment file (or the defaults), apply ``--set`` overrides and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config: file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config: {path} is not valid TOML ({err})") from None
    cfg = _build(Config, apply_overrides(raw, overrides or []), "")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _check(key: str, ok: bool, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; must be {allowed}")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    d, m, t, f, a = cfg.data, cfg.model, cfg.train, cfg.federation, cfg.analysis
    _one_of("data.dataset", d.dataset, DATASETS)
    _one_of("data.partitioner", d.partitioner, PARTITIONERS)
    _check("data.alpha", d.alpha > 0, d.alpha, "> 0")
    _check("data.min_partition_size", d.min_partition_size >= 0, d.min_partition_size, ">= 0")
    _check("data.classes_per_client", d.classes_per_client >= 1, d.classes_per_client, ">= 1")
    _check("data.shards_per_client", d.shards_per_client >= 1, d.shards_per_client, ">= 1")
    _check("data.test_fraction", 0 < d.test_fraction < 1, d.test_fraction, "in (0, 1)")
    _check("data.max_samples", d.max_samples >= 0, d.max_samples, ">= 0 (0 = all)")
    _check("data.max_test_samples", d.max_test_samples >= 0, d.max_test_samples, ">= 0 (0 = all)")
    _one_of("data.pool", d.pool, POOLS)
    _one_of("data.normalize", d.normalize, NORMALIZATIONS)
    _one_of("data.label_shift", d.label_shift, LABEL_SHIFTS)
    _one_of("model.name", m.name, MODELS)
    _one_of("model.norm", m.norm, NORMS)
    _check("train.epochs", t.epochs >= 1, t.epochs, ">= 1")
    _check("train.lr", t.lr > 0, t.lr, "> 0")
    _check("train.momentum", 0 <= t.momentum < 1, t.momentum, "in [0, 1)")
    _check("train.weight_decay", t.weight_decay >= 0, t.weight_decay, ">= 0")
    _check("train.batch_size", t.batch_size >= 1, t.batch_size, ">= 1")
    _one_of("train.device", t.device, DEVICES)
    _one_of("strategy.finetune", cfg.strategy.finetune, FINETUNES)
    s = cfg.strategy
    _check_lmc(cfg)
    _check("strategy.finetune_steps", s.finetune_steps >= 0, s.finetune_steps, ">= 0")
    _check("strategy.finetune_epochs", s.finetune_epochs >= 0, s.finetune_epochs, ">= 0")
    _check("federation.clients", f.clients >= 1, f.clients, ">= 1")
    _check("federation.rounds", f.rounds >= 1, f.rounds, ">= 1")
    _check("federation.fraction_train", 0 < f.fraction_train <= 1, f.fraction_train, "in (0, 1]")
    _check("federation.fraction_evaluate", 0 < f.fraction_evaluate <= 1, f.fraction_evaluate, "in (0, 1]")
    _check("federation.min_train_clients", f.min_train_clients >= 1, f.min_train_clients, ">= 1")
    _check("federation.client_cpus", f.client_cpus > 0, f.client_cpus, "> 0")
    _check("federation.client_gpus", f.client_gpus >= 0, f.client_gpus, ">= 0")
    _check("analysis.every", a.every >= 0, a.every, ">= 0 (0 = off)")
    _one_of("analysis.pairs", a.pairs, ("clients", "global", "both"))
    _check(
        "analysis.max_clients",
        a.max_clients >= 2 and (a.every == 0 or a.max_clients <= f.clients),
        a.max_clients,
        f">= 2 and <= federation.clients={f.clients} when analysis.every > 0",
    )
    _one_of("analysis.data", a.data, ("global_test", "pair_train"))
    _check("analysis.samples", a.samples >= 1, a.samples, ">= 1")
    _check(
        "analysis.alphas",
        not a.alphas or (len(a.alphas) >= 2 and all(0 <= x <= 1 for x in a.alphas) and _distinct(a.alphas)),
        a.alphas,
        "[] (midpoint only) or at least 2 distinct values in [0, 1]",
    )
    for order in a.cumulative:
        _one_of("analysis.cumulative", order, ("shallow", "deep", "random", "minimal"))
    _one_of("analysis.bn", a.bn, ("interpolate", "reset"))
    _check("analysis.num_gpus", a.num_gpus >= 0, a.num_gpus, ">= 0")
    _check("analysis.num_cpus", a.num_cpus >= 0, a.num_cpus, ">= 0")


def _check_lmc(cfg: Config) -> None:
    s, a = cfg.strategy, cfg.analysis
    _one_of("strategy.lmc_source", s.lmc_source, LMC_SOURCES)
    _check("strategy.lmc_every", s.lmc_every >= 1, s.lmc_every, ">= 1")
    _check("strategy.lmc_samples", s.lmc_samples >= 1, s.lmc_samples, ">= 1")
    _one_of("strategy.lmc_statistic", s.lmc_statistic, LMC_STATISTICS)
    _check("strategy.lmc_quantile", 0 <= s.lmc_quantile <= 1, s.lmc_quantile, "in [0, 1]")
    _check("strategy.lmc_threshold", s.lmc_threshold >= 0, s.lmc_threshold, ">= 0")
    _check("strategy.lmc_alpha", 0 < s.lmc_alpha <= 1, s.lmc_alpha, "in (0, 1]")
    fraction = s.lmc_share_fraction
    _check("strategy.lmc_share_fraction", 0 <= fraction <= 1, fraction, "0 (use lmc_threshold) or in (0, 1]")
    if s.name == "lmc" and s.lmc_source == "server":
        _check(
            "strategy.lmc_source",
            a.every > 0 and s.lmc_every % a.every == 0,
            s.lmc_source,
            "'clients' unless analysis.every > 0 divides strategy.lmc_every ('server' reads the analysis)",
        )


def _distinct(values: list[float]) -> bool:
    return len(set(values)) == len(values)


def check_gpus(cfg: Config, available: int) -> None:
    """The GPU shares the run asks for must fit the GPUs this machine has.

    Not part of :func:`validate`: clients validate the same config on machines with other devices.
    Ray schedules at least one client actor beside the analysis actor, so both shares must fit.
    """
    f, a = cfg.federation, cfg.analysis
    analysis_gpus = a.num_gpus if a.every > 0 else 0.0
    if f.client_gpus > 0 and available == 0:
        raise ConfigError(
            f"federation.client_gpus: {f.client_gpus!r} is not allowed; no CUDA device is available"
        )
    if analysis_gpus + f.client_gpus > available:
        raise ConfigError(
            f"analysis.num_gpus: {a.num_gpus!r} is not allowed; analysis.num_gpus + federation.client_gpus "
            f"= {analysis_gpus + f.client_gpus:g} must be <= {available} available GPU(s)"
        )


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """Serialize (top-level scalars first, then one table per section)."""
    raw = to_dict(cfg)
    lines = [f"{k} = {_toml_value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for section, values in raw.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


_ = types  # keep import for get_type_hints on PEP 604 unions
