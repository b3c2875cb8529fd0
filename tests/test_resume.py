"""A run killed with SIGKILL and resumed ends exactly like an uninterrupted run with the same seed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from sim_helpers import ROOT, assert_same_model, cli_args, env, is_ray_agent, metrics, run

from fedlayer.processes import ProcessRecord
from fedlayer.run.files import CHECKPOINT, FLOWER_LOG, LOCK_FILE, SESSION_FILE

pytestmark = pytest.mark.slow


def run_until_killed(
    args: list[str], out: Path, after_rows: int, timeout: float = 240, group: bool = True
) -> int:
    """Start ``args`` in its own process group; SIGKILL the group (``group=False``: the CLI process only, as
    the OOM killer or `kill -9 PID` would, leaving Ray's processes behind) once metrics.jsonl has
    ``after_rows``."""
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
                if group:
                    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and the Ray processes it started
                else:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()  # dead before the check below, which would kill the whole group
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return len((out / "metrics.jsonl").read_text().splitlines())


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_fmnist: Path, tmp_path: Path) -> None:
    """Only the CLI process is killed: Ray's processes outlive it, and `--resume` stops them first."""
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # fedavgm: server momentum must survive the restart too.
    extra = ("strategy.aggregator='fedavgm'", "strategy.server_momentum=0.5")
    run(cli_args(tiny_fmnist, reference, *extra))  # first, so that the resume follows the kill at once
    rows_at_kill = run_until_killed(cli_args(tiny_fmnist, killed, *extra), killed, after_rows=2, group=False)
    assert rows_at_kill < 4
    done = torch.load(killed / CHECKPOINT, weights_only=True)["round"]
    assert 1 <= done < 4
    record = ProcessRecord.load(killed / SESSION_FILE)
    assert record is not None
    left = record.leftovers()
    assert any(is_ray_agent(p) for p in left), "the killed run left Ray's agents running"
    assert (killed / LOCK_FILE).exists()
    try:
        run([sys.executable, "-m", "fedlayer.cli", "run", "--resume", str(killed)])  # takes the stale lock
    finally:
        for proc in record.alive():  # whatever a failed resume left
            with contextlib.suppress(psutil.Error):
                proc.kill()
    assert record.alive() == []
    log = (killed / FLOWER_LOG).read_text().splitlines()
    [line] = [x for x in log if "stopped what a killed run left" in x]
    # Some of Ray's processes notice their driver's death and end on their own before the resume looks
    # (and its raylet may start a worker meanwhile): the resume names what it found and stopped.
    stopped = {int(pid) for pid in re.findall(r"\((\d+)\)", line)}
    assert stopped & {p.pid for p in left}
    assert not (killed / LOCK_FILE).exists()
    assert metrics(killed) == metrics(reference)
    assert_same_model(killed / "model.pt", reference / "model.pt")
    # Personal states: one file per partition is all a checkpoint needs.
    assert all(len(list(p.glob("*.pt"))) <= 1 for p in (killed / "clients").iterdir())
