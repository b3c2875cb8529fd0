"""Real Flower simulations (Ray backend) through the CLI, on tiny data in the real IDX format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_cli(
    data_root: Path, out: Path, *overrides: str, timeout: int = 420
) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "fedlayer.cli",
        "run",
        "experiments/default.toml",
        "--out",
        str(out),
        "--set",
        f"data.root='{data_root}'",
        "--set",
        "data.min_partition_size=5",
        "--set",
        "federation.clients=3",
        "--set",
        "federation.rounds=2",
        "--set",
        "train.batch_size=16",
    ]
    for item in overrides:
        args += ["--set", item]
    env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def read_metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fedavg_simulation_writes_a_complete_run_directory(tiny_fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli(tiny_fmnist, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = read_metrics(out)
    assert [r["round"] for r in rows] == [1, 2]
    for key in (
        "global_acc",
        "global_loss",
        "personalized_acc",
        "train_loss",
        "bytes_up",
        "bytes_down",
        "round_seconds",
        "personalized_acc_worst10",
    ):
        assert all(key in r for r in rows), key
    assert rows[-1]["clients_trained"] == 3
    assert rows[-1]["global_acc"] > 0.5  # the tiny data is learnable; chance is 0.1
    state = torch.load(out / "model.pt", weights_only=True)
    assert "fc2.weight" in state
    partition = json.loads((out / "partition.json").read_text())
    assert len(partition["clients"]) == 3
    for name in ("accuracy.png", "partition.png", "config.resolved.toml", "layers.json", "flower.log"):
        assert (out / name).exists(), name
    # The console shows fedlayer's progress only; Flower's and Ray's notices are kept in flower.log.
    console = proc.stdout + proc.stderr
    assert "FutureWarning" not in console and "DEPRECATED" not in console, console
    flower_log = (out / "flower.log").read_text()
    assert "DEPRECATED FEATURE: The `run_simulation` function" in flower_log
    assert "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" in flower_log
    # FedAvg sends the whole model both ways: 3 clients x model bytes per direction at least.
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert rows[0]["bytes_up"] >= 3 * model_bytes


def test_failed_run_exits_nonzero(tiny_fmnist: Path, tmp_path: Path) -> None:
    """A selector matching no layer is caught before Ray starts: exit 2, one line."""
    proc = run_cli(tiny_fmnist, tmp_path / "bad", "strategy.name='partial'", "strategy.shared=['nolayer*']")
    assert proc.returncode == 2
    assert "strategy.shared" in proc.stderr


def test_malloc_arenas_are_capped_unless_the_environment_sets_them() -> None:
    """In a child process (mallopt changes its allocator for good): glibc accepts the cap; a user's
    MALLOC_ARENA_MAX is left as it is."""
    code = "from fedlayer.simulation import limit_malloc_arenas; print(limit_malloc_arenas())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    glibc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    capped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert capped.stdout.strip() == str(bool(glibc))
    env["MALLOC_ARENA_MAX"] = "4"
    kept = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert kept.stdout.strip() == "False"
