"""Every bad input exits with code 2 and one line naming the key, the value and what is allowed.

Table-driven through ``fedlayer.cli.main``; nothing is started and no run directory is created or changed.
"""

from __future__ import annotations

import copy
import tomllib
import typing
from pathlib import Path

import pytest
from torchvision import datasets as tv

from fedlayer.cli import main
from fedlayer.config import (
    AGGREGATOR_NAMES,
    ALGORITHM_NAMES,
    MODELS,
    Config,
    ConfigError,
    apply_overrides,
    check_gpus,
    config_from_dict,
    load_config,
    read_toml,
    reference_markdown,
    reference_rows,
    to_toml,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "experiments" / "default.toml")

# (overrides, key named in the error, a fragment of the value or the allowed values)
CASES: list[tuple[list[str], str, str]] = [
    (["nosection.key=1"], "nosection", "allowed: seed, data"),
    (["federation.nope=1"], "federation.nope", "allowed: clients"),
    (["train.lr='fast'"], "train.lr", "expected float, got 'fast'"),
    (["federation.clients=2.5"], "federation.clients", "expected int, got 2.5"),
    (["analysis.alphas=0.5"], "analysis.alphas", "expected a list of float"),
    (["train.lr=-1"], "train.lr", "> 0"),
    (["train.lr=0"], "train.lr", "> 0"),
    (["data.alpha=0"], "data.alpha", "> 0"),
    (["data.alpha=-0.5"], "data.alpha", "> 0"),
    (["data.dataset='imagenet'"], "data.dataset", "fashion_mnist, mnist, cifar10, cifar100"),
    (["model.name='gpt'"], "model.name", "cnn, mlp, resnet18, vgg11"),
    (["strategy.name='fedfoo'"], "strategy.name", "fedavg"),
    (["strategy.aggregator='median'"], "strategy.aggregator", "fedmedian"),
    (["data.partitioner='random'"], "data.partitioner", "iid, dirichlet"),
    (["federation.fraction_train=1.5"], "federation.fraction_train", "in (0, 1]"),
    (["federation.fraction_train=0"], "federation.fraction_train", "in (0, 1]"),
    (["federation.fraction_evaluate=-0.1"], "federation.fraction_evaluate", "in (0, 1]"),
    (["federation.evaluate_every=0"], "federation.evaluate_every", ">= 1"),
    (["analysis.every=-1"], "analysis.every", ">= 0"),
    (["analysis.max_clients=1"], "analysis.max_clients", "or 2 to federation.clients=10"),
    (["federation.clients=3", "analysis.every=1", "analysis.max_clients=4"], "analysis.max_clients", "=3"),
    (["analysis.every=1", "analysis.max_clients=20"], "analysis.max_clients", "federation.clients=10"),
    (["analysis.alphas=[0.0, 0.5, 1.5]"], "analysis.alphas", "in [0, 1]"),
    (["analysis.alphas=[0.5, 0.5]"], "analysis.alphas", "distinct"),
    (["analysis.alphas=[0.5]"], "analysis.alphas", "at least 2"),
    (["analysis.every=1", "analysis.num_gpus=1"], "analysis.num_gpus", "must be <= 0: 0 available GPU(s)"),
    (["federation.client_gpus=0.5"], "federation.client_gpus", "no CUDA device"),
    (["train.lr=inf"], "train.lr", "inf is not allowed; must be a finite number"),
    (["train.lr=nan"], "train.lr", "nan is not allowed; must be a finite number"),
    (["analysis.alphas=[0.0, nan]"], "analysis.alphas[1]", "finite"),
    (
        ["federation.clients=3", "federation.min_train_clients=4"],
        "federation.min_train_clients",
        "<= federation.clients=3",
    ),
    (["seed=-1"], "seed", ">= 0"),
    (["strategy.trim_beta=0.5"], "strategy.trim_beta", "in [0, 0.5)"),
    (
        ["analysis.cumulative=['sideways']"],
        "analysis.cumulative[0]",
        "choose one of: shallow, deep, random, minimal",
    ),
    (["data.dataset=3"], "data.dataset", "expected str, got 3"),
]

# Cases that reach the data: they run against the tiny dataset of the ``tiny_fmnist`` fixture.
DATA_CASES: list[tuple[list[str], str, str]] = [
    (["federation.clients=50", "data.max_samples=20"], "federation.clients", "only 20 training samples"),
    (["federation.clients=10", "data.min_partition_size=100"], "data.min_partition_size", "> 600"),
    (
        ["federation.clients=20", "data.alpha=0.01", "data.min_partition_size=25"],
        "data.alpha",
        "raise data.alpha",
    ),
    (
        ["data.min_partition_size=5", "strategy.name='partial'", "strategy.shared=['nolayer*']"],
        "strategy.shared",
        "matches no block",
    ),
    (
        ["data.min_partition_size=5", "strategy.name='lmc'", "strategy.lmc_always=['nolayer*']"],
        "strategy.lmc_always",
        "matches no block",
    ),
    # FedBN keeps the norm layers personal: a model without any is the model's fault, not strategy.exclude's
    (["data.min_partition_size=5", "strategy.name='fedbn'"], "model.norm", "choose one of: batch, group"),
]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def assert_one_line_naming(err: str, key: str, fragment: str) -> None:
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fedlayer: error: "), err
    assert key in err and fragment in err, err


@pytest.mark.parametrize(("overrides", "key", "fragment"), CASES, ids=[c[1] + ":" + c[0][-1] for c in CASES])
def test_bad_config_exits_2_naming_key_value_and_allowed(
    overrides: list[str], key: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["run", DEFAULT, "--out", str(out)] + [a for o in overrides for a in ("--set", o)]
    code, err = run_main(argv, capsys)
    assert code == 2
    assert_one_line_naming(err, key, fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"), DATA_CASES, ids=[c[1] + ":" + c[0][-1] for c in DATA_CASES]
)
def test_bad_data_config_exits_2(
    overrides: list[str],
    key: str,
    fragment: str,
    tiny_fmnist: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    sets = [f"data.root='{tiny_fmnist}'", *overrides]
    code, err = run_main(
        ["run", DEFAULT, "--out", str(out)] + [a for o in sets for a in ("--set", o)], capsys
    )
    assert code == 2
    assert_one_line_naming(err, key, fragment)
    assert not out.exists()


def test_missing_data_without_download_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty data.root and a failing download (stubbed: no network attempt) is one clear line."""

    def no_network(self: object) -> None:
        raise RuntimeError("network disabled in tests")

    monkeypatch.setattr(tv.MNIST, "download", no_network)  # FashionMNIST inherits it
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    code, err = run_main(["run", DEFAULT, "--out", str(out), "--set", f"data.root='{empty}'"], capsys)
    assert code == 2
    assert_one_line_naming(err, "data.root", "download failed (network disabled in tests)")
    assert not out.exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(["run", str(tmp_path / "nope.toml")], capsys)
    assert code == 2
    assert_one_line_naming(err, "config", "does not exist")


def test_existing_run_directory_needs_overwrite_or_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    code, err = run_main(["run", DEFAULT, "--out", str(out)], capsys)
    assert code == 2
    assert_one_line_naming(err, "--out", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_bad_config_with_overwrite_leaves_the_run_directory_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    code, _ = run_main(["run", DEFAULT, "--out", str(out), "--overwrite", "--set", "train.lr=0"], capsys)
    assert code == 2
    assert (out / "metrics.jsonl").read_text() == '{"round": 1}\n'


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ([], "no config.resolved.toml"),
        (["--set", "train.lr=0.1"], "only federation.rounds and federation.ray_address may change"),
        (["--out", "elsewhere"], "drop --out"),
    ],
)
def test_resume_refuses_what_it_cannot_continue(
    extra: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_main(["run", "--resume", str(tmp_path), *extra], capsys)
    assert code == 2
    assert_one_line_naming(err, "--", fragment)


def test_resume_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.resolved.toml").write_text("seed = 0\n")
    code, err = run_main(["run", "--resume", str(tmp_path)], capsys)
    assert code == 2
    assert_one_line_naming(err, "--resume", "no checkpoint.pt")


def test_gpu_shares_fit_the_available_gpus() -> None:
    """One check for every caller: client shares, and the analysis share beside every client actor."""
    analysis = ["analysis.every=1", "analysis.num_gpus=0.5"]
    check_gpus(load_config(DEFAULT, [*analysis, "federation.client_gpus=0.25"]), available=1, cpus=2)
    with pytest.raises(ConfigError, match=r"analysis.num_gpus: 0.5 .* <= 0: 1 available .* 2 client actor"):
        check_gpus(load_config(DEFAULT, [*analysis, "federation.client_gpus=0.5"]), available=1, cpus=2)
    check_gpus(load_config(DEFAULT, [*analysis, "federation.client_gpus=0.5"]), available=1, cpus=1)
    with pytest.raises(ConfigError, match=r"federation.client_gpus: 2.0 .* <= 1 available"):
        check_gpus(load_config(DEFAULT, ["federation.client_gpus=2"]), available=1, cpus=2)
    check_gpus(
        load_config(DEFAULT, ["analysis.num_gpus=1"]), available=0, cpus=2
    )  # analysis off: not reserved


# ----------------------------------------------------------------------------- more bad inputs


FLOAT_KEYS = [key for key, kind, *_ in reference_rows() if kind == "float"]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_must_be_finite(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: {value} is not allowed; must be a finite number$"):
        load_config(DEFAULT, [f"{key}={value}"])


@pytest.mark.parametrize("clients", [1, 2, 3])
def test_defaults_never_conflict_with_valid_settings(clients: int) -> None:
    """Defaults that depend on federation.clients (analysis.max_clients, min_train_clients) follow it."""
    cfg = load_config(DEFAULT, [f"federation.clients={clients}", "analysis.every=1"])
    assert cfg.federation.min_clients == min(2, clients)
    assert cfg.analysis.pair_clients == 3  # pairs_of takes at most the sampled clients
    with pytest.raises(ConfigError, match="federation.min_train_clients"):
        load_config(DEFAULT, [f"federation.clients={clients}", f"federation.min_train_clients={clients + 1}"])


def test_config_that_is_a_directory_or_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "latin1.toml"
    binary.write_bytes("seed = 0 # café\n".encode("latin-1"))
    out = tmp_path / "run"
    for path, fragment in ((tmp_path, "is a directory"), (binary, "is not UTF-8 text")):
        code, err = run_main(["run", str(path), "--out", str(out)], capsys)
        assert code == 2
        assert_one_line_naming(err, "config", fragment)
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "partitions"])
@pytest.mark.parametrize(
    ("where", "fragment"),
    [("file", "is a file; give a directory"), ("below_file", "is a file, so"), ("proc", "is not writable")],
)
def test_out_that_cannot_be_a_directory(
    command: str, where: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "file"
    file.write_text("keep")
    out = {"file": file, "below_file": file / "run", "proc": Path("/proc/fedlayer-test-run")}[where]
    code, err = run_main([command, DEFAULT, "--out", str(out)], capsys)
    assert code == 2
    assert_one_line_naming(err, "--out", fragment)
    assert file.read_text() == "keep"


def test_partitions_refuses_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "partition.json").write_text("the run's")
    (run / "metrics.jsonl").write_text('{"round": 1}\n')
    code, err = run_main(["partitions", DEFAULT, "--out", str(run)], capsys)
    assert code == 2
    assert_one_line_naming(err, "--out", "holds other files (metrics.jsonl, partition.json)")
    assert (run / "partition.json").read_text() == "the run's"


def test_partitions_writes_again_into_its_own_output(tiny_fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    args = ["partitions", DEFAULT, "--out", str(out), "--set", f"data.root='{tiny_fmnist}'"]
    args += ["--set", "data.min_partition_size=5", "--set", "federation.clients=3"]
    assert main(args) == 0
    assert main(args) == 0
    assert (out / "partition.json").exists()


def test_deploy_supernodes_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["deploy", "local", DEFAULT, "--supernodes", "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--supernodes: 0 is not allowed; must be >= 1" in err and "federation.clients" not in err


# ----------------------------------------------------------------------------- one source of truth


def test_registries_match_the_config_literals() -> None:
    from fedlayer.analysis import BN_MODES, ORDERS
    from fedlayer.config import DATASETS, AnalysisConfig
    from fedlayer.data.sources import SPECS
    from fedlayer.models import MODEL_CLASSES
    from strategies import AGGREGATORS, ALGORITHMS

    assert tuple(MODEL_CLASSES) == MODELS
    assert tuple(SPECS) == DATASETS
    assert tuple(AGGREGATORS) == AGGREGATOR_NAMES
    assert tuple(ALGORITHMS) == ALGORITHM_NAMES
    assert {a.aggregator for a in ALGORITHMS.values()} - {None} <= set(AGGREGATOR_NAMES)
    hints = typing.get_type_hints(AnalysisConfig)
    assert typing.get_args(typing.get_args(hints["cumulative"])[0]) == ORDERS
    assert typing.get_args(hints["bn"]) == BN_MODES


COMMITTED = sorted((ROOT / "experiments").rglob("*.toml"))


@pytest.mark.parametrize("path", COMMITTED, ids=[str(p.relative_to(ROOT)) for p in COMMITTED])
def test_committed_experiment_configs_load(path: Path) -> None:
    """Experiment files, and every setting of a grid file (its base experiment + the setting's overrides)."""
    from fedlayer.grid import Grid

    if "grid" not in read_toml(path):
        load_config(path)
        return
    grid = Grid.read(path)
    for setting in grid.settings:
        config_from_dict(apply_overrides(copy.deepcopy(grid.experiment), list(setting.overrides)))


def test_toml_written_by_tomli_w_reads_back_to_the_same_config() -> None:
    cfg = load_config(
        DEFAULT,
        [
            "strategy.name='partial'",
            "strategy.shared=['conv*', 're:fc\\d']",
            "analysis.alphas=[0.0, 0.5, 1.0]",
            """data.root='/data/a "b"'""",
        ],
    )
    assert config_from_dict(tomllib.loads(to_toml(cfg))) == cfg
    assert to_toml(Config()) == to_toml(config_from_dict({}))


def test_config_reference_is_current() -> None:
    """docs/config.md is `fedlayer config --reference`; regenerate it when a declaration changes."""
    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown()
    keys = [row[0] for row in reference_rows()]
    assert len(keys) == len(set(keys)) and "analysis.max_clients" in keys and "seed" in keys
    assert all(row[4] for row in reference_rows()), "every key has a meaning"


def test_data_cache_is_keyed_on_what_determines_the_data(tiny_fmnist: Path) -> None:
    from fedlayer.experiment import federated_data

    base = [f"data.root='{tiny_fmnist}'", "data.min_partition_size=5", "federation.clients=3"]
    data = federated_data(load_config(DEFAULT, base))
    assert federated_data(load_config(DEFAULT, [*base, "train.lr=0.5", "analysis.every=1"])) is data
    assert federated_data(load_config(DEFAULT, [*base, "seed=1"])) is not data


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("", []),
        ("federation.rounds=2;train.lr=0.01", ["federation.rounds=2", "train.lr=0.01"]),
        ("federation.rounds=2 federation.clients=4", ["federation.rounds=2", "federation.clients=4"]),
        ("a.b=1;\n c.d = 2 ;", ["a.b=1", "c.d = 2"]),
        ("strategy.shared=['conv1', 'fc2'] seed=1", ["strategy.shared=['conv1', 'fc2'] seed=1"]),
        ("data.root='/my data/x' train.lr=1", ["data.root='/my data/x'", "train.lr=1"]),
    ],
)
def test_run_config_overrides_split_on_semicolons_and_before_the_next_key(
    text: str, items: list[str]
) -> None:
    from fedlayer.server.app import run_config_overrides

    assert run_config_overrides(text) == items


def test_a_run_config_override_without_a_value_names_the_separator() -> None:
    from fedlayer.server.app import run_config_overrides

    with pytest.raises(
        ConfigError, match=r"overrides: 'rounds' is not section.key=value; separate overrides with ';'"
    ):
        run_config_overrides("federation.clients=4;rounds")


def test_evaluated_rounds_are_every_nth_and_the_last() -> None:
    federation = load_config(None, ["federation.rounds=7", "federation.evaluate_every=3"]).federation
    assert [r for r in range(1, 8) if federation.evaluates(r)] == [3, 6, 7]
    default = load_config(None, ["federation.rounds=3"]).federation
    assert all(default.evaluates(r) for r in range(1, 4))
