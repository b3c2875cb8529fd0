"""The README's `flwr run .` commands, from a shell whose PATH lacks the venv, make a complete run dir."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from sim_helpers import ROOT

from fedlayer.config import load_config, to_toml
from fedlayer.processes import terminate_all

# `make test` runs these after the others, one at a time (they watch processes, signals or ports).
pytestmark = [pytest.mark.slow, pytest.mark.serial]
VENV = Path(sys.executable).parent.parent


def readme_commands() -> str:
    """The bash block of the README's "With `flwr run`" section, continuation lines joined."""
    section = (ROOT / "README.md").read_text().split("### With `flwr run`", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return block.replace("\\\n", " ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_superlink(control_port: int) -> None:
    """The local SuperLink `flwr run` started (found by its control port), its executors and their Ray."""
    address = f"127.0.0.1:{control_port}"
    links = [p for p in psutil.process_iter() if _cmdline_has(p, address)]
    procs = [*links, *(child for link in links for child in link.children(recursive=True))]
    groups = {_group(p) for p in procs} - {None, os.getpgid(0)}  # never this test's own group
    procs += [p for p in psutil.process_iter() if _group(p) in groups]  # Ray's orphans keep their group
    terminate_all({p.pid: p for p in procs}.values(), grace=5)


def _cmdline_has(proc: psutil.Process, text: str) -> bool:
    with contextlib.suppress(psutil.Error):
        return text in proc.cmdline()
    return False


def _group(proc: psutil.Process) -> int | None:
    with contextlib.suppress(OSError):
        return os.getpgid(proc.pid)
    return None


def test_flwr_run_as_the_readme_says(tiny_fmnist: Path, tmp_path: Path) -> None:
    commands = readme_commands()
    assert commands.startswith("source .venv/bin/activate")
    assert "flwr run . --stream" in commands
    experiment = tmp_path / "tiny.toml"
    overrides = [f"data.root='{tiny_fmnist}'", "data.min_partition_size=5", "federation.clients=3"]
    overrides += ["strategy.name='fedper'"]
    experiment.write_text(to_toml(load_config(ROOT / "experiments" / "default.toml", overrides)))
    out = tmp_path / "out"
    # The README's commands with this checkout's venv, the tiny experiment and 3 SuperNodes; two overrides
    # separated by a space (';' is the documented separator; the obvious alternative works too).
    script = commands.replace(".venv/", f"{VENV}/")
    run_config = f"config='{experiment}' overrides='federation.rounds=2 train.batch_size=16' out='{out}'"
    script = re.sub(r'--run-config "[^"]*"', f'--run-config "{run_config}"', script)
    script = re.sub(r"num-supernodes=\d+", "num-supernodes=3", script)
    # Then a run with a bad override, on the SuperLink the first one left running: one line, no traceback.
    bad = f"config='{experiment}' overrides='federation.rounds=2;train.lr=oops' out='{tmp_path / 'bad'}'"
    script += "\n" + re.sub(r'--run-config "[^"]*"', f'--run-config "{bad}"', script.splitlines()[-1])
    http_port, control_port = free_port(), free_port()
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",  # no venv: the README's activation must provide it
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "FLWR_HOME": str(tmp_path / "flwr"),  # not the user's ~/.flwr; its own SuperLink ports
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    try:
        proc = subprocess.run(
            ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
    finally:
        stop_superlink(control_port)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout + proc.stderr
    assert "fedlayer: train.lr: expected float, got 'oops'" in printed, printed[-3000:]
    assert "Traceback" not in printed, printed[-3000:]
    assert (out / "summary.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "Starting" in (out / "flower.log").read_text()  # Flower's log of the run
    assert sorted(p.name for p in (out / "clients").iterdir()) == [f"partition-{i}" for i in range(3)]
    assert not [p for p in psutil.process_iter() if _cmdline_has(p, f"127.0.0.1:{control_port}")]
