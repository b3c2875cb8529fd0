"""The ``flwr`` CLI against one SuperLink: wait for SuperNodes, submit a run, follow it to its end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w

from fedlayer.processes import terminate
from fedlayer.run.files import FLOWER_LOG

CONNECTION = "fedlayer"  # the [superlink.<name>] entry written into the isolated FLWR_HOME
COMPLETED = "finished:completed"
# What the FAB needs; staging these keeps `flwr run` from walking .venv and runs/ (5 s here).
APP_FILES = ("pyproject.toml", "README.md", "fedlayer", "strategies", "experiments")
RESULTS = "results"  # experiments/results: committed figures, tens of MB the FAB leaves out anyway
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
class RunOutcome:
    """The final state of a submitted run."""

    run_id: int
    status: str  # e.g. finished:completed, finished:failed, finished:stopped
    details: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


def executable(name: str) -> str:
    """A Flower console script from this interpreter's environment (PATH as a fallback)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found; install flwr in this environment (pip install -e .)")
    return found


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the app's sources (``APP_FILES``) into ``dest``, the directory ``flwr run`` packs."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in APP_FILES:
        src = app_dir / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=_not_staged)
        elif src.is_file():
            shutil.copyfile(src, dest / name)
    return dest


def _not_staged(directory: str, names: list[str]) -> set[str]:
    """Bytecode everywhere and the results folder of ``experiments/``."""
    skipped = set(shutil.ignore_patterns("__pycache__", "*.pyc")(directory, names))
    if Path(directory).name == "experiments":
        skipped.add(RESULTS)
    return skipped


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file ("" if it does not exist)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


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
            [executable("flwr"), *args],
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
        path.write_text(tomli_w.dumps(run_config))
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
            terminate(streams, grace=5.0)

    def stop_run(self, run_id: int) -> None:
        """``flwr stop``: ask the SuperLink to stop the run (best effort)."""
        with contextlib.suppress(DeployError, subprocess.TimeoutExpired):
            self.flwr("stop", str(run_id), CONNECTION, timeout=20)

    def close(self) -> None:
        for log in self._logs:
            log.close()
        self._logs.clear()

    def _write_config(self) -> None:
        entry: dict[str, str | bool] = {"address": self.address}
        if self.ca is None:
            entry["insecure"] = True
        else:
            entry["root-certificates"] = str(Path(self.ca).resolve())
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": CONNECTION, CONNECTION: entry}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))

    def _start_stream(self, run_id: int, echo: IO[str] | None) -> subprocess.Popen[bytes]:
        command = [executable("flwr"), "log", str(run_id), CONNECTION, "--stream"]
        log = open(self.workdir / FLOWER_LOG, "ab")  # noqa: SIM115 -- closed in close()
        self._logs.append(log)
        if echo is None:
            return subprocess.Popen(
                command, cwd=self.cwd, env=self.env(), stdout=log, stderr=subprocess.STDOUT
            )
        return _tee(command, self.cwd, self.env(), log, echo)


def _tee(
    command: list[str], cwd: Path, env: dict[str, str], log: IO[bytes], echo: IO[str]
) -> subprocess.Popen[bytes]:
    """Start ``command`` with its output copied to ``log`` and ``echo`` by a reader thread."""
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


def _last_json(text: str) -> dict[str, Any]:
    """The JSON object that ``flwr ... --format json`` prints (after any other output)."""
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in output")
    obj = json.loads(text[start:])
    if not isinstance(obj, dict):
        raise ValueError("JSON output is not an object")
    return obj
