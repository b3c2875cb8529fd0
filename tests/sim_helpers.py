"""Helpers for the tests that run real simulations through the CLI in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from fedlayer.processes import terminate_all, using
from fedlayer.run.files import CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
# The only fields allowed to differ between identical runs: wall-clock time and the Ray node ids clients ran
# on (new ids in every Ray session).
NONDETERMINISTIC = ("round_seconds", "client_nodes")


def is_ray_agent(proc: psutil.Process) -> bool:
    """Ray's dashboard or runtime-env agent (named ray::...Agent once it has set its process title)."""
    with contextlib.suppress(psutil.Error):
        return "agent" in " ".join(proc.cmdline()).lower()
    return False


def cli_args(data_root: Path, out: Path | None, *overrides: str) -> list[str]:
    """A 4-client, 4-round run on the tiny dataset; half the clients train each round (seeded sampling)."""
    sets = [
        f"data.root='{data_root}'",
        "data.min_partition_size=5",
        "federation.clients=4",
        "federation.rounds=4",
        "federation.fraction_train=0.5",
        "train.batch_size=16",
        "strategy.name='fedper'",
        *overrides,
    ]
    args = [sys.executable, "-m", "fedlayer.cli", "run", "experiments/default.toml"]
    args += ["--out", str(out)] if out is not None else []
    return args + [a for s in sets for a in ("--set", s)]


def env() -> dict[str, str]:
    return os.environ | {"FLWR_TELEMETRY_ENABLED": "0"}


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def metrics(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in NONDETERMINISTIC} for row in rows]


def assert_same_model(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``args`` in its own process group (a terminal's Ctrl-C reaches the whole group); output to ``log``."""
    with open(log, "wb") as fh:
        return subprocess.Popen(
            args, cwd=ROOT, env=env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_rows(out: Path, rows: int, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    """Until ``out/metrics.jsonl`` has ``rows`` rows and ``checkpoint.pt`` is written (the run must still be
    going)."""
    path = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= rows and (out / CHECKPOINT).exists()):
        assert proc.poll() is None, f"the run ended with {proc.returncode} before round {rows}"
        assert time.monotonic() < deadline, f"no round {rows} within {timeout} s"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def ray_cluster(nodes: int, cpus: int) -> Iterator[tuple[str, str]]:
    """A Ray cluster of ``nodes`` raylets with ``cpus`` CPUs each; yields (address, temp dir).

    In a temp dir of its own, so that no other test's ``ray.init()`` finds it (Ray joins the cluster named in
    /tmp/ray/ray_current_cluster), and stopped alone (never `ray stop`: it stops every Ray on the machine).
    """
    temp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    common = ["--num-cpus", str(cpus), "--temp-dir", temp, "--node-ip-address", "127.0.0.1"]
    common += ["--object-store-memory", str(100 * 2**20), "--disable-usage-stats"]
    head = ["--head", "--port", str(port), "--include-dashboard", "false"]
    head += ["--ray-client-server-port", str(free_port())]  # its own ports, not Ray's fixed defaults
    try:
        for node in [head] + [["--address", f"127.0.0.1:{port}"]] * (nodes - 1):
            agent = ["--dashboard-agent-listen-port", str(free_port())]
            started = subprocess.run(  # the workers it starts import this checkout (PYTHONPATH)
                [str(RAY), "start", *node, *agent, *common],
                env=env(),
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"127.0.0.1:{port}", temp
    finally:
        terminate_all(using(temp))
        shutil.rmtree(temp, ignore_errors=True)
