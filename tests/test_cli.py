"""Bad input exits with code 2 and one line naming the key; nothing is started."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlayer.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "experiments" / "default.toml")


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.lr=-1", "train.lr"),
        ("train.lr='fast'", "train.lr"),
        ("data.alpha=0", "data.alpha"),
        ("data.dataset='imagenet'", "data.dataset"),
        ("model.name='gpt'", "model.name"),
        ("strategy.name='fedfoo'", "strategy.name"),
        ("strategy.aggregator='median'", "strategy.aggregator"),
        ("federation.fraction_train=1.5", "federation.fraction_train"),
        ("federation.nope=1", "federation.nope"),
        ("nosection.key=1", "nosection"),
        ("analysis.every=-1", "analysis.every"),
        ("analysis.max_clients=1", "analysis.max_clients"),
        ("data.partitioner='random'", "data.partitioner"),
    ],
)
def test_bad_input_exits_2_naming_the_key(
    override: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(["run", DEFAULT, "--set", override, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("fedlayer: error: ") and named in err
    assert not out.exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_existing_run_directory_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    assert main(["run", DEFAULT, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"round": 1}\n'
