"""A SuperLink and N SuperNodes as processes on 127.0.0.1, each SuperNode on its own partition."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from fedlayer.config import ConfigError
from fedlayer.contract import NODE_DATA_DIR, NODE_PARTITION_ID, NODE_PARTITIONS, NODE_STATE_DIR
from fedlayer.deploy.flwr_cli import (
    CONNECTION,
    START_TIMEOUT,
    DeployError,
    FlwrControl,
    RunOutcome,
    executable,
    tail,
)
from fedlayer.processes import stop, terminate, with_environment
from fedlayer.run.files import FLOWER_LOG

HOST = "127.0.0.1"
NODE_MARK = "FEDLAYER_SUPERNODE"  # environment variable naming the SuperNode a process belongs to


@dataclass(frozen=True)
class TlsFiles:
    """Certificates made by ``docker/certs.sh``: a CA and a server certificate for 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, certdir: str | Path) -> TlsFiles:
        """Read ``ca.crt``, ``server.pem`` and ``server.key`` from ``certdir``."""
        root = Path(certdir).resolve()
        files = cls(root / "ca.crt", root / "server.pem", root / "server.key")
        missing = [p.name for p in (files.ca, files.cert, files.key) if not p.is_file()]
        if missing:
            raise ConfigError(
                f"--tls: {root} lacks {', '.join(missing)}; make them with docker/certs.sh {root}"
            )
        return files


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def default_app_dir() -> Path:
    """The Flower app directory: the checkout whose pyproject.toml declares ``[tool.flwr.app]``."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and "app" in tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}):
        return root
    raise ConfigError(
        f"--app: no pyproject.toml with [tool.flwr.app] next to {root / 'fedlayer'}; "
        "pass --app DIR (a fedlayer checkout)"
    )


def check_options(supernodes: int, tls: TlsFiles | None, auth: bool) -> None:
    """ConfigError (one line naming the flag) for a deployment that cannot be made."""
    if supernodes < 1:
        raise ConfigError(f"--supernodes: {supernodes} is not allowed; must be >= 1")
    if auth and tls is None:
        raise ConfigError("--auth: SuperNode authentication needs TLS; pass --tls CERTDIR as well")


def write_key_pair(stem: Path) -> tuple[Path, Path]:
    """A SuperNode's authentication keys (NIST P-384, OpenSSH format, as ``ssh-keygen -t ecdsa -b 384``):
    ``stem.key`` (private, mode 600) and ``stem.pub`` (registered with ``flwr supernode register``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = stem.with_suffix(".key"), stem.with_suffix(".pub")
    stem.parent.mkdir(parents=True, exist_ok=True)
    private.touch(mode=0o600)
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


class LocalDeployment:
    """A SuperLink and ``supernodes`` SuperNodes as local processes; a context manager.

    Flower 1.42 runs the ServerApp in a ``flwr-serverapp`` process that the SuperLink's own
    ``flower-superexec`` starts per run (``--isolation subprocess``, the default); every SuperNode starts a
    ``flower-superexec`` too, which launches one ``flwr-clientapp`` process per message. The ClientApps keep
    their personal layers in the SuperNode's ``state-dir`` (node config; here ``supernode-<i>-state`` in
    the work directory), so a restarted SuperNode continues with them.

    A SuperNode that dies is a fault the run survives (its train reply is an error); the SuperExec and
    ClientApp processes it leaves behind are stopped at once. Every process carries ``FLWR_HOME`` of this
    deployment (and ``FEDLAYER_SUPERNODE``) in its environment, so none is missed when its parent is gone.

    Parameters
    ----------
    supernodes : int
        Number of SuperNodes; SuperNode ``i`` gets ``partition-id=i num-partitions=supernodes``.
    app_dir : Path
        The Flower app submitted by ``flwr run`` (holds pyproject.toml with ``[tool.flwr.app]``).
    tls : TlsFiles | None
        Certificates for the SuperLink (Fleet, Control and Runtime API); ``None`` = insecure HTTP.
    workdir : Path | None
        Where FLWR_HOME and the process logs live; ``None`` = a temporary directory, removed on stop.
    cwd : Path | None
        Working directory of every Flower process (relative ``data.root`` resolves against it).
    node_data : Path | None
        SuperNode ``i`` trains on its own data in ``node_data/partition-<i>`` (node config ``data-dir``;
        see ``fedlayer partitions --export``) instead of partition ``i`` of the benchmark.
    auth : bool
        SuperNode authentication (needs ``tls``): the SuperLink accepts only SuperNodes whose public keys
        were registered (``flwr supernode register``); each SuperNode signs with its own private key.
    """

    def __init__(
        self,
        supernodes: int,
        app_dir: Path,
        tls: TlsFiles | None = None,
        workdir: Path | None = None,
        cwd: Path | None = None,
        *,
        node_data: Path | None = None,
        auth: bool = False,
    ) -> None:
        check_options(supernodes, tls, auth)
        self.supernodes = supernodes
        self.node_data = Path(node_data).resolve() if node_data else None
        self.auth = auth
        self.app_dir = Path(app_dir).resolve()
        self.tls = tls
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedlayer-deploy-")).resolve()
        self.cwd = Path(cwd or Path.cwd()).resolve()
        self.port = 0
        self.control: FlwrControl | None = None
        self.superlink: subprocess.Popen[bytes] | None = None
        self.nodes: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._cleaned: set[int] = set()  # SuperNodes that died and whose children were stopped

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, then the SuperNodes; return once all of them are online."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        ca = self.tls.ca if self.tls else None
        self.control = FlwrControl(self.workdir, f"{HOST}:{self.port}", ca, self.cwd)
        self.control.alive_check = self._check_alive
        self.superlink = self._spawn("superlink", self._superlink_command())
        _wait_for_port(self.port, self.superlink, self.log_file("superlink"))
        for _ in range(self.supernodes):
            self.add_supernode()
        deadline = time.monotonic() + START_TIMEOUT
        for i, node in enumerate(self.nodes):
            _wait_for_text(self.log_file(f"supernode-{i}"), "SuperNode ID:", node, deadline)
        self.control.wait_for_nodes(self.supernodes, max(1.0, deadline - time.monotonic()))

    def add_supernode(self, *, register: bool = True) -> subprocess.Popen[bytes]:
        """Start SuperNode ``len(nodes)``; with ``auth``, its key is made and registered first.

        ``register=False`` starts it without a registered key, as a SuperNode that is not part of the
        federation would come: with ``auth`` the SuperLink refuses it.
        """
        index = len(self.nodes)
        command = self._supernode_command(index)
        if self.auth and register:
            private, public = write_key_pair(self.workdir / "keys" / f"supernode-{index}")
            self._control().flwr("supernode", "register", str(public), CONNECTION)
            command += ["--auth-supernode-private-key", str(private)]
        self.nodes.append(self._spawn(f"supernode-{index}", command))
        return self.nodes[-1]

    def stop(self) -> None:
        """Terminate every process this deployment started, their children included."""
        marked = with_environment({"FLWR_HOME": str(self._control().flwr_home)}) if self.control else []
        terminate([*self.nodes, *([self.superlink] if self.superlink else [])], also=marked)
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self.control is not None:
            self.control.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill_supernode(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Fault injection: signal the process of SuperNode ``index`` only, as a crash would."""
        self.nodes[index].send_signal(sig)
        self.nodes[index].wait(timeout=30)

    def restart_supernode(self, index: int) -> None:
        """Start SuperNode ``index`` again (after :meth:`kill_supernode`): same node config, same key."""
        command = self._supernode_command(index)
        if self.auth:
            command += ["--auth-supernode-private-key", str(self.workdir / "keys" / f"supernode-{index}.key")]
        self.nodes[index] = self._spawn(f"supernode-{index}", command)

    def submit(self, run_config: dict[str, str]) -> int:
        """Submit the app with ``run_config``; the run id (see :meth:`FlwrControl.submit`)."""
        return self._control().submit(self.app_dir, run_config)

    def wait(self, run_id: int, **kwargs: Any) -> RunOutcome:
        """Follow the run to its end (see :meth:`FlwrControl.wait`)."""
        return self._control().wait(run_id, **kwargs)

    def stop_run(self, run_id: int) -> None:
        self._control().stop_run(run_id)

    def log_file(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def collect(self, out: Path) -> None:
        """Copy the Flower logs into the run directory: ``flower.log`` (ServerApp), ``deploy/*.log``."""
        logs = out / "deploy"
        logs.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.workdir.glob("*.log")):
            target = out / FLOWER_LOG if path.name == FLOWER_LOG else logs / path.name
            shutil.copyfile(path, target)

    def _control(self) -> FlwrControl:
        if self.control is None:
            raise DeployError("the deployment is not started")
        return self.control

    def _superlink_command(self) -> list[str]:
        command = [executable("flower-superlink"), "--host", HOST, "--port", str(self.port)]
        command.append("--disable-runtime-dependency-installation")
        if self.tls is None:
            return [*command, "--insecure"]
        tls = self.tls
        certs = {"--ssl-certfile": tls.cert, "--ssl-keyfile": tls.key, "--ssl-ca-certfile": tls.ca}
        command += [arg for flag, path in certs.items() for arg in (flag, str(path))]
        return [*command, "--enable-supernode-auth"] if self.auth else command

    def _supernode_command(self, index: int) -> list[str]:
        state_dir = json.dumps(str(self.workdir / f"supernode-{index}-state"))
        node_config = (
            f"{NODE_PARTITION_ID}={index} {NODE_PARTITIONS}={self.supernodes} {NODE_STATE_DIR}={state_dir}"
        )
        if self.node_data is not None:
            node_config += f" {NODE_DATA_DIR}={json.dumps(str(self.node_data / f'partition-{index}'))}"
        command = [executable("flower-supernode"), "--superlink", f"{HOST}:{self.port}"]
        command += ["--port", str(free_port()), "--node-config", node_config]
        # The SuperNode's own Runtime API (ClientApp processes) stays on plain HTTP at 127.0.0.1.
        if self.tls is None:
            return [*command, "--insecure"]
        return [*command, "--root-certificates", str(self.tls.ca)]

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.log_file(name), "ab")  # noqa: SIM115 -- closed in stop()
        self._logs.append(log)
        # Own session: Ctrl-C reaches only this process, which then shuts the deployment down in order.
        env = self._control().env() | {NODE_MARK: name}
        return subprocess.Popen(
            command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _check_alive(self) -> None:
        """Raise if the SuperLink is gone; stop what a SuperNode that died left running."""
        if self.superlink is not None and self.superlink.poll() is not None:
            log = tail(self.log_file("superlink"))
            raise DeployError(f"the SuperLink exited ({self.superlink.returncode}):\n{log}")
        for index, node in enumerate(self.nodes):
            if index not in self._cleaned and node.poll() is not None:
                self._cleaned.add(index)
                home = str(self._control().flwr_home)
                stop(with_environment({"FLWR_HOME": home, NODE_MARK: f"supernode-{index}"}), timeout=10)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"the SuperLink exited ({proc.returncode}):\n{tail(log)}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"the SuperLink did not listen on {HOST}:{port} within {START_TIMEOUT:.0f} s")


def _wait_for_text(log: Path, text: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise DeployError(f"{log.stem} exited ({proc.returncode}):\n{tail(log)}")
        time.sleep(0.2)
    raise DeployError(f"{log.stem} did not connect within {START_TIMEOUT:.0f} s:\n{tail(log)}")
