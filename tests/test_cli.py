"""CLI plumbing; the table of bad inputs (exit code 2, one line naming the key) is in test_config.py."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedlayer.cli import main
from fedlayer.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "experiments" / "default.toml")


def test_set_without_equals_sign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", DEFAULT, "--set", "train.lr", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedlayer: error: --set 'train.lr': expected dotted.key=value"


def test_argument_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", DEFAULT, "--no-such-flag"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedlayer: error: unrecognized arguments: --no-such-flag (see fedlayer --help)"


def test_config_prints_the_resolved_toml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", DEFAULT, "--set", "train.lr=0.1", "--set", "strategy.shared=[]"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert config_from_dict(printed) == load_config(DEFAULT, ["train.lr=0.1"])


def test_config_reference_prints_docs_config_md(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == (ROOT / "docs" / "config.md").read_text()
    assert main(["config", "--reference", "--set", "train.lr=1"]) == 2
    assert "drop CONFIG and --set" in capsys.readouterr().err


def test_a_bad_config_is_reported_before_torch_flower_or_ray_load(tmp_path: Path) -> None:
    """Validation first, heavy imports later: the speed of a config error (bench/config_latency.py)."""
    probe = (
        "import sys; from fedlayer.cli import main; code = main(['run', 'experiments/default.toml', "
        "'--set', 'train.lr=inf', '--out', sys.argv[1]]); "
        "print(code, sorted(m for m in ('torch', 'flwr', 'ray', 'numpy') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr


def test_a_missing_data_root_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torchvision makes DATA_ROOT/FashionMNIST/raw before it tries to download (no internet here)."""
    root, out = tmp_path / "missing" / "root", tmp_path / "run"
    assert main(["run", DEFAULT, "--set", f"data.root='{root}'", "--out", str(out)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"fedlayer: error: data.root: fashion_mnist not found in {root} ")
    assert list(tmp_path.iterdir()) == []
