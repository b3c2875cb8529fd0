"""``fedlayer deploy local``: the experiment on Flower's Deployment Engine, all processes on 127.0.0.1.

One ``flower-superlink`` and N ``flower-supernode`` processes (each with ``partition-id=i
num-partitions=N`` in its node config), the run submitted with ``flwr run`` against an isolated
``FLWR_HOME``. Flower 1.42 runs the ServerApp in a ``flwr-serverapp`` process that the SuperLink's own
``flower-superexec`` starts per run (``--isolation subprocess``, the default); every SuperNode starts a
``flower-superexec`` too, which launches one ``flwr-clientapp`` process per message. The ClientApp's
``context.state`` (personal layers) is kept by the SuperNode between those processes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from fedlayer.config import Config, ConfigError, load_config
from fedlayer.inputs import add_config, add_out, check_before_start, check_out, load, positive_int

HOST = "127.0.0.1"
CONNECTION = "fedlayer"  # the [superlink.<name>] entry written into the isolated FLWR_HOME
COMPLETED = "finished:completed"
# What the FAB needs; staging these keeps `flwr run` from walking .venv and runs/ (5 s here).
APP_FILES = ("pyproject.toml", "README.md", "fedlayer", "strategies", "experiments")
START_TIMEOUT = 90.0  # SuperLink up and every SuperNode online; 2-core machines need ~10 s
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # no background request to a package index from every process
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # use this environment, no `uv sync` per run
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # default 1 s per task launch, i.e. per message
}


class DeployError(RuntimeError):
    """The deployment could not be brought up, or the run did not complete."""


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


@dataclass(frozen=True)
class RunOutcome:
    """The final state of a submitted run."""

    run_id: int
    status: str  # e.g. finished:completed, finished:failed, finished:stopped
    details: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def default_app_dir() -> Path:
    """The Flower app directory: the checkout whose pyproject.toml declares ``[tool.flwr.app]``."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and "app" in tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}):
        return root
    raise ConfigError(
        f"--app: no pyproject.toml with [tool.flwr.app] next to {root / 'fedlayer'}; "
        "pass --app DIR (a fedlayer checkout)"
    )


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the app's sources (``APP_FILES``) into ``dest``, the directory ``flwr run`` packs."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in APP_FILES:
        src = app_dir / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.is_file():
            shutil.copyfile(src, dest / name)
    return dest


class FlwrControl:
    """The ``flwr`` CLI against one SuperLink, with its own FLWR_HOME (the user's ~/.flwr stays untouched).

    Parameters
    ----------
    workdir : Path
        Holds FLWR_HOME (``flwr-home/config.toml`` with one ``[superlink.fedlayer]`` entry), the staged
        app, run-config files and ``flower.log`` (the streamed ServerApp log).
    address : str
        The SuperLink's Control API, ``host:port``.
    ca : Path | None
        CA certificate that signed the SuperLink's certificate; ``None`` = insecure HTTP.
    cwd : Path | None
        Working directory of the ``flwr`` processes.
    """

    def __init__(self, workdir: Path, address: str, ca: Path | None = None, cwd: Path | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.address = address
        self.ca = ca
        self.cwd = Path(cwd or Path.cwd()).resolve()
        self.alive_check: Callable[[], None] | None = None  # raises DeployError when the SuperLink is gone
        self._logs: list[IO[bytes]] = []
        self._write_config()

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    def env(self) -> dict[str, str]:
        """Environment of every Flower process: isolated FLWR_HOME, this venv's bin first on PATH."""
        bin_dir = str(Path(sys.executable).parent)
        path = bin_dir + os.pathsep + os.environ.get("PATH", "")
        return os.environ | FLWR_ENV | {"FLWR_HOME": str(self.flwr_home), "PATH": path}

    def flwr(self, *args: str, timeout: float = 120) -> str:
        """Run ``flwr ARGS``; its stdout (DeployError on a non-zero exit)."""
        proc = subprocess.run(
            [_executable("flwr"), *args],
            cwd=self.cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise DeployError(f"flwr {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc.stdout

    def online_nodes(self) -> int:
        """``flwr supernode list``: how many SuperNodes the SuperLink sees online."""
        out = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        return sum(node.get("status") == "online" for node in _last_json(out).get("nodes", []))

    def wait_for_nodes(self, count: int, timeout: float = START_TIMEOUT) -> None:
        """Return once ``count`` SuperNodes are online (a run would otherwise start with fewer)."""
        deadline = time.monotonic() + timeout
        while (online := self.online_nodes()) < count:
            if time.monotonic() > deadline:
                raise DeployError(f"{online} of {count} SuperNodes online after {timeout:.0f} s")
            time.sleep(1.0)

    def submit(self, app_dir: Path, run_config: dict[str, str]) -> int:
        """``flwr run`` the app with ``run_config`` (written as a TOML file); return the run id."""
        path = self.workdir / f"run-config-{time.time_ns()}.toml"
        path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in run_config.items()))
        app = stage_app(Path(app_dir), self.workdir / "app")
        out = self.flwr("run", str(app), CONNECTION, "--run-config", str(path), "--format", "json")
        try:
            return int(_last_json(out)["run-id"])
        except (ValueError, KeyError, TypeError):
            raise DeployError(f"flwr run did not start a run:\n{out.strip()}") from None

    def run_status(self, run_id: int) -> tuple[str, str]:
        """``flwr ls --run-id``: the run's status (e.g. ``finished:failed``) and its details."""
        out = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            run = _last_json(out)["runs"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise DeployError(f"flwr ls gave no status for run {run_id}:\n{out.strip()}") from None
        return str(run["status"]), str(run.get("status-details", ""))

    def wait(
        self,
        run_id: int,
        *,
        timeout: float = 0.0,
        on_tick: Callable[[], None] | None = None,
        echo: IO[str] | None = None,
    ) -> RunOutcome:
        """Stream the run's log into ``flower.log`` until the run finishes; return its final status.

        ``timeout`` (seconds, 0 = none) raises DeployError; ``on_tick`` runs about twice a second
        (progress); ``echo`` also receives every log line.
        """
        started = time.monotonic()
        streams = [self._start_stream(run_id, echo)]
        try:
            while True:
                if on_tick is not None:
                    on_tick()
                if self.alive_check is not None:
                    self.alive_check()
                if streams[-1].poll() is not None:  # the log stream ends when the run is finished
                    status, details = self.run_status(run_id)
                    if status.startswith("finished"):
                        return RunOutcome(run_id, status, details, time.monotonic() - started)
                    time.sleep(2.0)  # the stream dropped before the run ended: follow it again
                    streams.append(self._start_stream(run_id, echo))
                if timeout and time.monotonic() - started > timeout:
                    raise DeployError(f"run {run_id} did not finish within {timeout:.0f} s")
                time.sleep(0.5)
        finally:
            _terminate(streams, grace=5.0)

    def stop_run(self, run_id: int) -> None:
        """``flwr stop``: ask the SuperLink to stop the run (best effort)."""
        with contextlib.suppress(DeployError, subprocess.TimeoutExpired):
            self.flwr("stop", str(run_id), CONNECTION, timeout=20)

    def close(self) -> None:
        for log in self._logs:
            log.close()
        self._logs.clear()

    def _write_config(self) -> None:
        entry = [f"address = {json.dumps(self.address)}"]
        if self.ca is None:
            entry.append("insecure = true")
        else:
            entry.append(f"root-certificates = {json.dumps(str(Path(self.ca).resolve()))}")
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        text = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n' + "\n".join(entry)
        (self.flwr_home / "config.toml").write_text(text + "\n")

    def _start_stream(self, run_id: int, echo: IO[str] | None) -> subprocess.Popen[bytes]:
        command = [_executable("flwr"), "log", str(run_id), CONNECTION, "--stream"]
        log = open(self.workdir / "flower.log", "ab")  # noqa: SIM115 -- closed in close()
        self._logs.append(log)
        if echo is None:
            return subprocess.Popen(
                command, cwd=self.cwd, env=self.env(), stdout=log, stderr=subprocess.STDOUT
            )
        return _tee(command, self.cwd, self.env(), log, echo)


class LocalDeployment:
    """A SuperLink and ``supernodes`` SuperNodes as local processes; a context manager.

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
        self._subreaper = False

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
        self._subreaper = _set_child_subreaper(True)
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
        _terminate([*self.nodes, *([self.superlink] if self.superlink else [])])
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self.control is not None:
            self.control.close()
        if self._subreaper:
            _set_child_subreaper(False)
            self._subreaper = False
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kill_supernode(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Fault injection: signal SuperNode ``index`` with its SuperExec and ClientApp processes."""
        proc = self.nodes[index]
        orphans = _descendants(proc.pid)
        _signal_group(proc.pid, sig)
        proc.wait(timeout=30)
        _reap(orphans, time.monotonic() + 30)

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
        command = [_executable("flower-superlink"), "--host", HOST, "--port", str(self.port)]
        command.append("--disable-runtime-dependency-installation")
        if self.tls is None:
            return [*command, "--insecure"]
        tls = self.tls
        certs = {"--ssl-certfile": tls.cert, "--ssl-keyfile": tls.key, "--ssl-ca-certfile": tls.ca}
        return command + [arg for flag, path in certs.items() for arg in (flag, str(path))]

    def _supernode_command(self, index: int) -> list[str]:
        node_config = f"partition-id={index} num-partitions={self.supernodes}"
        command = [_executable("flower-supernode"), "--superlink", f"{HOST}:{self.port}"]
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
            tail = _tail(self.log_file("superlink"))
            raise DeployError(f"the SuperLink exited ({self.superlink.returncode}):\n{tail}")


# -- processes --------------------------------------------------------------------------------------


def _executable(name: str) -> str:
    """A Flower console script from this interpreter's environment (PATH as a fallback)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found; install flwr in this environment (pip install -e .)")
    return found


def _tee(
    command: list[str], cwd: Path, env: dict[str, str], log: IO[bytes], echo: IO[str]
) -> subprocess.Popen[bytes]:
    """Start ``command`` with its output copied to ``log`` and ``echo`` by a reader thread."""
    import threading

    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def pump() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            log.write(line)
            log.flush()
            echo.write(line.decode(errors="replace"))
            echo.flush()

    threading.Thread(target=pump, daemon=True).start()
    return proc


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; empty elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _terminate(procs: Sequence[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM each process with its descendants (SuperExec, ServerApp, ClientApps); SIGKILL stragglers.

    The SuperLink starts its SuperExec in a new session, so process groups alone miss it: the
    descendants are collected from /proc before anything is signalled.
    """
    live = [p for p in procs if p.poll() is None]
    extra = [d for p in live for d in _descendants(p.pid)]
    for proc in live:
        _signal_group(proc.pid, signal.SIGTERM)
    for pid in extra:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in live:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    _reap(extra, deadline)


def _reap(pids: list[int], deadline: float) -> None:
    """Wait for orphaned descendants (ours to reap while we are their child subreaper)."""
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        pending = {pid for pid in pending if _alive(pid)}
        time.sleep(0.1)
    for pid in pending:
        _signal(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)  # reaps it if it is our (adopted) child
        if done == pid:
            return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _set_child_subreaper(on: bool) -> bool:
    """Adopt orphaned descendants (Linux prctl), so they can be reaped instead of lingering as zombies."""
    if not sys.platform.startswith("linux"):
        return False
    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(pr_set_child_subreaper, int(on), 0, 0, 0) == 0)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"the SuperLink exited ({proc.returncode}):\n{_tail(log)}")
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
            raise DeployError(f"{log.stem} exited ({proc.returncode}):\n{_tail(log)}")
        time.sleep(0.2)
    raise DeployError(f"{log.stem} did not connect within {START_TIMEOUT:.0f} s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _last_json(text: str) -> dict[str, Any]:
    """The JSON object that ``flwr ... --format json`` prints (after any other output)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in output")
    obj = json.loads(text[start:])
    if not isinstance(obj, dict):
        raise ValueError("JSON output is not an object")
    return obj


# -- the `fedlayer deploy` command --------------------------------------------------------------------


def deployment_overrides(cfg: Config, supernodes: int) -> list[str]:
    """Overrides that make the config fit ``supernodes`` SuperNodes (``federation.clients`` = N)."""
    extra = []
    if cfg.federation.clients != supernodes:
        extra.append(f"federation.clients={supernodes}")
    if cfg.analysis.max_clients > supernodes:
        extra.append(f"analysis.max_clients={supernodes}")
    return extra


def run_config(config: Path, overrides: Sequence[str], out: Path) -> dict[str, str]:
    """The app's run config (pyproject ``[tool.flwr.app.config]``): config file, overrides, run dir."""
    bad = [item for item in overrides if ";" in item]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: ';' separates overrides in the run config; drop it")
    return {"config": str(config.resolve()), "overrides": ";".join(overrides), "out": str(out.resolve())}


def prepare_out(out: Path, overwrite: bool) -> Path:
    """An empty run directory (the ServerApp refuses a non-empty one); --overwrite clears an old run."""
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out: run directory {str(out)!r} exists and is not empty; pass --overwrite")
        if not any((out / name).exists() for name in ("config.resolved.toml", "metrics.jsonl")):
            raise ConfigError(f"--out: {str(out)!r} is not a fedlayer run directory; not clearing it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def add_deploy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``deploy local CONFIG --supernodes N ...`` to the ``fedlayer`` subcommands."""
    deploy = subparsers.add_parser("deploy", help="run the experiment on Flower's Deployment Engine")
    targets = deploy.add_subparsers(dest="target", required=True)
    local = targets.add_parser(
        "local", help="a real SuperLink and N SuperNodes as processes on 127.0.0.1; `flwr run` submits"
    )
    add_config(local)
    local.add_argument("--supernodes", type=positive_int, default=2, help="SuperNodes = federation.clients")
    add_out(local, "run directory (default: runs/<config>-deploy-<timestamp>)")
    local.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    local.add_argument("--tls", metavar="CERTDIR", help="serve over TLS with docker/certs.sh certificates")
    local.add_argument("--app", help="Flower app directory (default: this fedlayer checkout)")
    local.add_argument("--timeout", type=float, default=0.0, help="seconds before giving up (0 = none)")
    local.add_argument("--keep-workdir", metavar="DIR", help="keep FLWR_HOME and process logs in DIR")
    local.add_argument("--verbose", action="store_true", help="print the ServerApp log as it streams")
    return deploy


def cmd_deploy(args: argparse.Namespace) -> int:
    """``fedlayer deploy local``: 0 when the run completed, 1 when it failed or the deployment broke."""
    cfg = load(args)
    forced = deployment_overrides(cfg, args.supernodes)
    if forced:
        print(f"deploy: {args.supernodes} SuperNodes, so setting {', '.join(forced)}")
    overrides = [*args.overrides, *forced]
    cfg = load_config(args.config, overrides)
    check_before_start(cfg)
    tls = TlsFiles.from_dir(args.tls) if args.tls else None
    app_dir = Path(args.app).resolve() if args.app else default_app_dir()
    out = prepare_out(check_out(args.out or _default_out(args.config)), args.overwrite)
    workdir = Path(args.keep_workdir).resolve() if args.keep_workdir else None
    with _terminate_on_sigterm():
        try:
            outcome = _deploy_and_run(
                args, cfg, app_dir, tls, workdir, run_config(Path(args.config), overrides, out)
            )
        except DeployError as err:
            print(f"fedlayer deploy: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("fedlayer deploy: interrupted; the deployment was shut down", file=sys.stderr)
            return 130
    return report(outcome, out)


def _deploy_and_run(
    args: argparse.Namespace,
    cfg: Config,
    app_dir: Path,
    tls: TlsFiles | None,
    workdir: Path | None,
    rc: dict[str, str],
) -> RunOutcome:
    from fedlayer.progress import RoundProgress

    out = Path(rc["out"])
    mode = "TLS" if tls else "insecure"
    print(f"deploy: starting a SuperLink ({mode}) and {args.supernodes} SuperNodes on {HOST}")
    with LocalDeployment(args.supernodes, app_dir, tls, workdir) as deployment:
        run_id = deployment.submit(rc)
        print(f"deploy: run {run_id} submitted; run directory {out}")
        try:
            with RoundProgress(cfg.federation.rounds) as progress:
                tick = _progress_from_metrics(out, progress.update)
                echo = sys.stdout if args.verbose else None
                outcome = deployment.wait(run_id, timeout=args.timeout, on_tick=tick, echo=echo)
        except BaseException:
            deployment.stop_run(run_id)
            deployment.collect(out)
            raise
        deployment.collect(out)
    return outcome


def report(outcome: RunOutcome, out: Path) -> int:
    """Write ``deploy.json``, print the outcome; the exit code (1 unless the run completed)."""
    from fedlayer.results import RunDir

    run = RunDir(out)
    summary = {"run_id": outcome.run_id, "status": outcome.status, "details": outcome.details}
    run.write_json("deploy.json", summary | {"seconds": outcome.seconds})
    print(f"run directory: {out}")
    if not outcome.ok:
        print(f"deploy: run {outcome.run_id} {outcome.status}: {outcome.details}", file=sys.stderr)
        print(_tail(out / "flower.log"), file=sys.stderr)
        return 1
    rows = run.read_jsonl()
    if rows:
        last = rows[-1]
        keys = [k for k in ("global_acc", "personalized_acc", "train_loss") if k in last]
        print(f"final round {last['round']}: " + ", ".join(f"{k} {last[k]:.4f}" for k in keys))
    return 0


def _progress_from_metrics(out: Path, update: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
    """A tick that feeds new metrics.jsonl rows (written by the ServerApp) to the progress bar."""
    seen = [0]

    def tick() -> None:
        path = out / "metrics.jsonl"
        if not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        for line in lines[seen[0] :]:
            with contextlib.suppress(json.JSONDecodeError):
                update(json.loads(line))
                seen[0] += 1

    return tick


def _default_out(config_path: str) -> Path:
    return Path("runs") / f"{Path(config_path).stem}-deploy-{time.strftime('%Y%m%d-%H%M%S')}"


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM (e.g. from a CI runner) shuts the deployment down like Ctrl-C does."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedlayer.deploy local ...`` (the same as ``fedlayer deploy local ...``)."""
    parser = argparse.ArgumentParser(prog="fedlayer")
    add_deploy_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return cmd_deploy(args)
    except ValueError as err:  # ConfigError, DataError, SelectorError: one line, as `fedlayer run`
        print(f"fedlayer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
