"""Every bad input exits with code 2 and one line naming the key, the value and what is allowed.

Table-driven through ``fedlayer.cli.main``; nothing is started and no run directory is created or changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torchvision import datasets as tv

from fedlayer.cli import main
from fedlayer.config import ConfigError, check_gpus, load_config

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
    (["analysis.every=-1"], "analysis.every", ">= 0"),
    (["analysis.max_clients=1"], "analysis.max_clients", ">= 2"),
    (["analysis.every=1", "analysis.max_clients=20"], "analysis.max_clients", "federation.clients=10"),
    (["analysis.alphas=[0.0, 0.5, 1.5]"], "analysis.alphas", "in [0, 1]"),
    (["analysis.alphas=[0.5, 0.5]"], "analysis.alphas", "distinct"),
    (["analysis.alphas=[0.5]"], "analysis.alphas", "at least 2"),
    (["analysis.every=1", "analysis.num_gpus=1"], "analysis.num_gpus", "<= 0 available GPU(s)"),
    (["federation.client_gpus=0.5"], "federation.client_gpus", "no CUDA device"),
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
        (["--set", "train.lr=0.1"], "only federation.rounds may change"),
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
    cfg = load_config(DEFAULT, ["analysis.every=1", "analysis.num_gpus=0.5", "federation.client_gpus=0.5"])
    check_gpus(cfg, available=1)
    too_much = ["analysis.every=1", "analysis.num_gpus=1", "federation.client_gpus=0.5"]
    with pytest.raises(ConfigError, match=r"analysis.num_gpus: 1.0 .* = 1.5 must be <= 1"):
        check_gpus(load_config(DEFAULT, too_much), available=1)
    check_gpus(load_config(DEFAULT, ["analysis.num_gpus=1"]), available=0)  # analysis off: not reserved
