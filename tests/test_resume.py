"""A run killed with SIGKILL and resumed ends exactly like an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sim_helpers import ROOT, assert_same_model, cli_args, env, metrics, run

from fedlayer.run.files import CHECKPOINT

pytestmark = pytest.mark.slow


def run_until_killed(args: list[str], out: Path, after_rows: int, timeout: float = 240) -> int:
    """Start ``args`` in its own process group; SIGKILL the group once metrics.jsonl has ``after_rows``."""
    proc = subprocess.Popen(
        args,
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            path = out / "metrics.jsonl"
            if path.exists() and len(path.read_text().splitlines()) >= after_rows:
                os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Ray processes it started
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return len((out / "metrics.jsonl").read_text().splitlines())


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_fmnist: Path, tmp_path: Path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # fedavgm: server momentum must survive the restart too.
    extra = ("strategy.aggregator='fedavgm'", "strategy.server_momentum=0.5")
    reference_args = cli_args(tiny_fmnist, reference, *extra)
    rows_at_kill = run_until_killed(cli_args(tiny_fmnist, killed, *extra), killed, after_rows=2)
    assert rows_at_kill < 4
    done = torch.load(killed / CHECKPOINT, weights_only=True)["round"]
    assert 1 <= done < 4
    resume_args = [sys.executable, "-m", "fedlayer.cli", "run", "--resume", str(killed)]
    run(reference_args)
    run(resume_args)
    assert metrics(killed) == metrics(reference)
    assert_same_model(killed / "model.pt", reference / "model.pt")
    # Personal states: one file per partition is all a checkpoint needs.
    assert all(len(list(p.glob("*.pt"))) <= 1 for p in (killed / "clients").iterdir())
