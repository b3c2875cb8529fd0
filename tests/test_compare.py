"""`fedlayer compare` / `report` on tiny data: table with stds, same partitions, resumable, re-rendered."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from sim_helpers import cli_args, start, wait_for_rows

from fedlayer.cli import main
from fedlayer.compare import Variant, split_specs, write_manifest
from fedlayer.config import ConfigError
from fedlayer.run.files import LOCK_FILE, SESSION_FILE

ROOT = Path(__file__).resolve().parents[1]


def test_strategy_specs() -> None:
    assert split_specs("fedavg,partial[conv1+fc2],local") == ["fedavg", "partial[conv1+fc2]", "local"]
    variant = Variant.parse("partial[conv1+fc2]")
    assert variant.overrides == ("strategy.name='partial'", 'strategy.shared=["conv1", "fc2"]')
    assert variant.folder == "partial_conv1_fc2"
    with pytest.raises(ConfigError, match="--strategies"):
        Variant.parse("fed avg")


def test_a_variant_carries_its_own_overrides() -> None:
    specs = split_specs("fedavg,fedbn{model.norm='batch';strategy.exclude=['fc1','fc2']},local")
    assert specs == ["fedavg", "fedbn{model.norm='batch';strategy.exclude=['fc1','fc2']}", "local"]
    assert Variant.parse(specs[1]).overrides == (
        "strategy.name='fedbn'",
        "model.norm='batch'",
        "strategy.exclude=['fc1','fc2']",
    )


@pytest.mark.parametrize(
    ("strategies", "seeds", "fragment"),
    [
        (
            "fedavg,partial[nomatch]",
            "0,1",
            "--strategies 'partial[nomatch]', seed 0: strategy.shared: pattern",
        ),
        (",", "0", "--strategies: give at least one strategy"),
        ("fedavg,fedavg", "0", "--strategies: 'fedavg' names the same runs"),
        ("fedavg,fedper{train.lr=inf}", "0", "--strategies 'fedper{train.lr=inf}': train.lr: inf"),
        ("fedbn", "0", "--strategies 'fedbn', seed 0: model.norm"),
        ("fedavg", "0,1.5", "--seeds: '0,1.5' is not a comma-separated list of integers"),
        ("fedavg", "0,0", "--seeds: seed 0 is given twice"),
    ],
)
def test_every_run_is_checked_before_anything_is_written(
    strategies: str,
    seeds: str,
    fragment: str,
    tiny_fmnist: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "cmp"
    args = ["compare", str(ROOT / "experiments" / "default.toml"), "--strategies", strategies]
    args += ["--seeds", seeds, "--out", str(out), "--set", f"data.root='{tiny_fmnist}'"]
    args += ["--set", "data.min_partition_size=5", "--set", "federation.clients=3"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()


def test_compare_refuses_an_out_that_is_not_a_compare_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "accuracy.png").write_text("a run's plot")
    args = [
        "compare",
        str(ROOT / "experiments" / "default.toml"),
        "--strategies",
        "fedavg",
        "--out",
        str(run),
    ]
    assert main(args) == 2
    assert "--out: " in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == ["accuracy.png"]


def test_a_later_sweep_into_the_same_directory_adds_to_its_runs(tmp_path: Path) -> None:
    config = str(ROOT / "experiments" / "default.toml")
    out = tmp_path / "cmp"
    write_manifest(config, [Variant.parse("fedavg")], [0], ["federation.rounds=2"], out)
    write_manifest(
        config, [Variant.parse("fedper"), Variant.parse("fedavg")], [1], ["federation.rounds=2"], out
    )
    manifest = json.loads((out / "sweep.json").read_text())
    assert [(r["strategy"], r["seed"]) for r in manifest["runs"]] == [
        ("fedavg", 0),
        ("fedper", 1),
        ("fedavg", 1),
    ]
    assert manifest["seeds"] == [0, 1]
    write_manifest(config, [Variant.parse("fedavg")], [0], ["federation.rounds=2"], out)  # resumed: no copy
    assert len(json.loads((out / "sweep.json").read_text())["runs"]) == 3


def test_a_directory_of_other_overrides_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(ROOT / "experiments" / "default.toml")
    out = tmp_path / "cmp"
    write_manifest(config, [Variant.parse("fedavg")], [0], ["federation.rounds=2"], out)
    before = (out / "sweep.json").read_text()
    args = ["compare", config, "--strategies", "fedper", "--seeds", "0", "--out", str(out)]
    assert main([*args, "--set", "federation.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set: " in err and "[federation.rounds=2]" in err, err
    other = str(ROOT / "experiments" / "lmc.toml")
    assert (
        main(["compare", other, "--strategies", "fedper", "--out", str(out), "--set", "federation.rounds=2"])
        == 2
    )
    assert "config: " in capsys.readouterr().err
    assert (out / "sweep.json").read_text() == before


@pytest.mark.slow
def test_compare_two_strategies_two_seeds(
    tiny_fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare",
        str(ROOT / "experiments" / "default.toml"),
        "--strategies",
        "fedavg,fedper",
        "--seeds",
        "0,1",
        "--out",
        str(out),
    ]
    for item in (
        f"data.root='{tiny_fmnist}'",
        "data.min_partition_size=5",
        "federation.clients=3",
        "federation.rounds=2",
        "analysis.every=2",
        "analysis.max_clients=2",
        "analysis.samples=100",
    ):
        args += ["--set", item]
    assert main(args) == 0
    with open(out / "table.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["strategy"] for r in rows] == ["fedavg", "fedper"]
    assert all(r["seeds"] == "2" and float(r["final_personalized_acc_std"]) >= 0 for r in rows)
    assert all(r["final_full_barrier"] not in ("", "nan") for r in rows)
    for row in rows:  # issue 13's columns, from metrics.jsonl and summary.json of real runs
        assert (
            0 < float(row["final_personalized_acc_pooled"]) <= float(row["best_personalized_acc_pooled"]) <= 1
        )
        assert float(row["best_round"]) in (1.0, 1.5, 2.0) and float(row["minutes_per_run"]) > 0
    assert "final pooled (%)" in (out / "table.md").read_text()
    runs = out / "runs"
    for seed in (0, 1):
        assert (runs / f"fedavg-seed{seed}" / "partition.json").read_text() == (
            runs / f"fedper-seed{seed}" / "partition.json"
        ).read_text()
    assert (runs / "fedavg-seed0" / "partition.json").read_text() != (
        runs / "fedavg-seed1" / "partition.json"
    ).read_text()
    for name in ("report.md", "accuracy.png", "barrier_heatmaps.png", "table.md"):
        assert (out / name).exists(), name

    mtimes = {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.jsonl")}
    table_csv, table_md = (out / "table.csv").read_text(), (out / "table.md").read_text()
    capsys.readouterr()
    assert main(args) == 0  # resumable: nothing left to run
    assert "4 already finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/metrics.jsonl")} == mtimes

    (out / "table.csv").unlink()
    (out / "table.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "table.csv").read_text() == table_csv
    assert (out / "table.md").read_text() == table_md


# `make test-all`, not CI: a run's Ctrl-C is test_lifecycle's; compare adds only the sweep's message
@pytest.mark.extended
@pytest.mark.slow
@pytest.mark.serial  # signals: `make test` runs it after the others, one at a time
def test_ctrl_c_stops_the_running_run_cleanly(tiny_fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "fedlayer.cli", "compare", str(ROOT / "experiments" / "default.toml")]
    args += ["--strategies", "fedavg,fedper", "--seeds", "0", "--out", str(out)]
    for item in cli_args(tiny_fmnist, None)[6::2]:  # the tiny run's --set values
        args += ["--set", item]
    proc = start(args, tmp_path / "compare.log")  # its own process group, as a terminal's job
    first = out / "runs" / "fedavg-seed0"
    try:
        wait_for_rows(first, 1, proc)
        proc.send_signal(signal.SIGTERM)  # `kill PID`, `timeout`, systemd: to the command only
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)  # and an impatient user's Ctrl-C
        proc.wait(timeout=300)
    except BaseException:  # compare's group and its run's (a session of its own)
        with contextlib.suppress(psutil.Error):
            for pid in [proc.pid, *(child.pid for child in psutil.Process(proc.pid).children())]:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        raise
    output = (tmp_path / "compare.log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1].startswith(f"fedlayer: interrupted; the finished runs in {out} ")
    # The run stopped by itself (not killed): its own resume line, its private Ray stopped and unrecorded.
    run_log = (out / "runs" / "fedavg-seed0.log").read_text()
    assert "fedlayer: interrupted; the last complete round is saved" in run_log, run_log[-3000:]
    assert "Traceback" not in run_log and "SIGTERM received" not in run_log
    assert not (first / SESSION_FILE).exists() and not (first / LOCK_FILE).exists()
    assert not (out / "runs" / "fedper-seed0").exists(), "no run starts after the Ctrl-C"
    # The same sweep again (here of the interrupted strategy only): the run continues from its checkpoint.
    done = [r for r in (first / "metrics.jsonl").read_text().splitlines() if r.strip()]
    again = [arg if arg != "fedavg,fedper" else "fedavg" for arg in args]
    finished = subprocess.run(again, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    rows = (first / "metrics.jsonl").read_text().splitlines()
    assert rows[: len(done)] == done and len(rows) == 4
    assert "fedlayer: resuming" in (first / "flower.log").read_text()
