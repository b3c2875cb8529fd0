"""A SuperLink and N SuperNodes as processes on 127.0.0.1, each SuperNode on its own partition."""

from __future__ import annotations

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
from fedlayer.deploy.flwr_cli import START_TIMEOUT, DeployError, FlwrControl, RunOutcome, executable, tail
from fedlayer.processes import descendants, signal_group, stop, terminate

HOST = "127.0.0.1"


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


class LocalDeployment:
    """A SuperLink and ``supernodes`` SuperNodes as local processes; a context manager.

    Flower 1.42 runs the ServerApp in a ``flwr-serverapp`` process that the SuperLink's own
    ``flower-superexec`` starts per run (``--isolation subprocess``, the default); every SuperNode starts a
    ``flower-superexec`` too, which launches one ``flwr-clientapp`` process per message. The ClientApp's
    ``context.state`` (personal layers) is kept by the SuperNode between those processes.

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
    """

    def __init__(
        self,
        supernodes: int,
        app_dir: Path,
        tls: TlsFiles | None = None,
        workdir: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        if supernodes < 1:
            raise ConfigError(f"--supernodes: {supernodes} is not allowed; must be >= 1")
        self.supernodes = supernodes
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
        for i in range(self.supernodes):
            self.nodes.append(self._spawn(f"supernode-{i}", self._supernode_command(i)))
        deadline = time.monotonic() + START_TIMEOUT
        for i, node in enumerate(self.nodes):
            _wait_for_text(self.log_file(f"supernode-{i}"), "SuperNode ID:", node, deadline)
        self.control.wait_for_nodes(self.supernodes, max(1.0, deadline - time.monotonic()))

    def stop(self) -> None:
        """Terminate every process this deployment started, their children included."""
        terminate([*self.nodes, *([self.superlink] if self.superlink else [])])
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self.control is not None:
            self.control.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill_supernode(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Fault injection: signal SuperNode ``index`` with its SuperExec and ClientApp processes."""
        proc = self.nodes[index]
        orphans = descendants(proc.pid)
        signal_group(proc.pid, sig)
        proc.wait(timeout=30)
        stop(orphans, timeout=30)

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
            target = out / "flower.log" if path.name == "flower.log" else logs / path.name
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
        return command + [arg for flag, path in certs.items() for arg in (flag, str(path))]

    def _supernode_command(self, index: int) -> list[str]:
        node_config = f"partition-id={index} num-partitions={self.supernodes}"
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
        env = self._control().env()
        return subprocess.Popen(
            command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _check_alive(self) -> None:
        if self.superlink is not None and self.superlink.poll() is not None:
            log = tail(self.log_file("superlink"))
            raise DeployError(f"the SuperLink exited ({self.superlink.returncode}):\n{log}")


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
