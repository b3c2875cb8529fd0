"""Process handling (psutil): stop process trees, find what a dead run left behind, lock a run directory,
and this process's own SIGTERM (:class:`Signalled`).

The one place for process handling; the simulation, the deployment and the CLI use these helpers. A recorded
process is named by its pid *and* its start time (:class:`ProcessId`), so a recycled pid is never mistaken
for the process that was recorded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fedlayer.run.atomic import write_atomic
from fedlayer.run.files import LOCK_FILE


class Signalled(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, systemd, ``docker stop``) raised as Ctrl-C's exception, so that every
    cleanup that handles Ctrl-C handles it too; the command exits with :func:`exit_code`."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_signalled(signum: int, frame: object) -> None:
    """A signal handler: raise :class:`Signalled` in the main thread. Later SIGINTs and SIGTERMs are
    ignored: the cleanup the first one started must not be cut short."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Signalled(signum)


def exit_code(stop: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended (130 for Ctrl-C)."""
    return 128 + getattr(stop, "signum", signal.SIGINT)


@dataclass(frozen=True)
class ProcessId:
    """A process as it was when recorded: pid plus start time (``psutil.Process.create_time``)."""

    pid: int
    started: float

    @classmethod
    def of(cls, proc: psutil.Process) -> ProcessId:
        return cls(proc.pid, proc.create_time())

    @classmethod
    def current(cls) -> ProcessId:
        return cls.of(psutil.Process())

    def process(self) -> psutil.Process | None:
        """The live process, or ``None`` when it exited (zombies count as exited) or its pid was reused."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.started) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (empty when ``pid`` is gone)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def with_environment(variables: Mapping[str, str]) -> list[psutil.Process]:
    """Live processes whose environment holds every one of ``variables``.

    Children inherit the environment, so this finds a process tree even after its root died and the
    children were re-parented (or started their own session).
    """
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            environ = proc.environ()
            if all(environ.get(key) == value for key, value in variables.items()):
                found.append(proc)
    return found


def terminate(
    procs: Sequence[subprocess.Popen[Any]], grace: float = 10.0, *, also: Iterable[psutil.Process] = ()
) -> None:
    """SIGTERM each process with its descendants (and ``also``); SIGKILL what is left after ``grace`` s.

    The descendants are collected before anything is signalled: once a parent exits, its children are
    re-parented and no longer found under it. Each root's process group is signalled too, which reaches
    children started between the snapshot and the signal.
    """
    live = [p for p in procs if p.poll() is None]
    own = {p.pid for p in live}
    family = {d.pid: d for d in [*(d for p in live for d in descendants(p.pid)), *also] if d.pid not in own}
    for proc in live:
        signal_tree_root(proc, signal.SIGTERM)
    _sigterm(family.values())
    deadline = time.monotonic() + grace
    for proc in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in live:
        if proc.poll() is None:
            signal_tree_root(proc, signal.SIGKILL)
            proc.wait()
    stop(family.values(), timeout=max(0.1, deadline - time.monotonic()))


def terminate_all(procs: Iterable[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM ``procs`` (found by psutil, not started here); SIGKILL what is left after ``grace`` s."""
    stop(_sigterm(procs), timeout=grace)


def _sigterm(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """SIGTERM each of ``procs``; returns those that were still there."""
    signalled = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
            signalled.append(proc)
    return signalled


def stop(procs: Iterable[psutil.Process], timeout: float = 10.0) -> None:
    """Wait up to ``timeout`` s for ``procs`` to be gone (reaped), SIGKILL the rest and wait for them."""
    _, alive = psutil.wait_procs(list(procs), timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


def signal_tree_root(proc: subprocess.Popen[Any], sig: int) -> None:
    """Send ``sig`` to the process group ``proc`` leads, or to ``proc`` alone when it leads none (started
    without a session of its own, it shares its parent's group: the group's id is not its pid)."""
    try:
        leads = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return
    if leads:
        signal_group(proc.pid, sig)
    else:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid`` (nothing if it is gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def references(proc: psutil.Process, directory: str) -> bool:
    """Whether ``proc`` names ``directory`` on its command line or has a file under it open."""
    inside = directory.rstrip("/") + "/"

    def names(text: str) -> bool:  # not a prefix of another directory's name (session_1 vs session_12)
        return inside in text or text.endswith(directory)

    try:
        return any(map(names, proc.cmdline())) or any(names(f.path) for f in proc.open_files())
    except psutil.Error:
        return False


def using(directory: str) -> list[psutil.Process]:
    """Every other process that names ``directory`` or has a file under it open."""
    me = os.getpid()
    return [proc for proc in psutil.process_iter() if proc.pid != me and references(proc, directory)]


def named(procs: Iterable[psutil.Process], prefix: str) -> list[psutil.Process]:
    """The processes of ``procs`` whose name (Ray's process title, e.g. ``ray::ClientAppActor``) starts
    with ``prefix``."""
    found = []
    for proc in procs:
        try:
            if proc.name().startswith(prefix):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def describe(procs: Iterable[psutil.Process]) -> str:
    """``name (pid), ...`` for log lines."""
    found = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            found.append(f"{proc.name()} ({proc.pid})")
    return ", ".join(found)


def ids(procs: Sequence[psutil.Process]) -> list[ProcessId]:
    """:class:`ProcessId` of each live process in ``procs``."""
    found = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(ProcessId.of(proc))
    return found


@dataclass
class ProcessRecord:
    """The processes a run started, kept in its run directory so that a later command can stop them.

    ``marker`` is a directory only these processes use (a Ray session directory): processes started
    after the record was written are recognised by it.
    """

    owner: ProcessId
    marker: str
    processes: list[ProcessId] = field(default_factory=list)

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> ProcessRecord | None:
        """The record at ``path``; ``None`` when there is none or it is unreadable (nothing to stop)."""
        try:
            raw = json.loads(path.read_text())
            return cls(
                ProcessId(**raw["owner"]), str(raw["marker"]), [ProcessId(**p) for p in raw["processes"]]
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def alive(self) -> list[psutil.Process]:
        """The live processes of this record: recorded ones plus any process that uses ``marker``."""
        found = {p.pid: p for rec in self.processes if (p := rec.process()) is not None}
        found |= {p.pid: p for p in using(self.marker)}
        return list(found.values())

    def leftovers(self) -> list[psutil.Process]:
        """What is still running although the owner died (nothing while the owner lives)."""
        return [] if self.owner.alive() else self.alive()


class LockHeld(Exception):
    """The run directory is locked by a live process; the message describes the holder."""


class RunLock:
    """Exclusive use of a run directory by this process: ``fcntl.flock`` on ``RUN_DIR/fedlayer.lock``.

    The kernel drops the lock when its process dies in any way (SIGKILL included), so the lock file of a
    killed run is stale and is simply taken over; the file names its holder for the error message.
    (A hand-rolled lock: the ``filelock`` package truncates the file on every attempt, which would erase
    the holder's description.)
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self.fd: int | None = None
        self.created = False
        self.stale: dict[str, Any] | None = None  # the description left by a dead holder, if any

    def acquire(self) -> RunLock:
        """Take the lock (creating the directory); :class:`LockHeld` when a live process holds it."""
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockHeld(_describe(self._holder())) from None
                raise
            if self._same_file(fd):  # else a releasing holder unlinked it meanwhile: lock the new file
                self.fd = fd
            else:
                os.close(fd)
        self.stale = self._holder()
        owner = ProcessId.current()
        text = json.dumps({"pid": owner.pid, "started": owner.started, "command": " ".join(sys.argv)})
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode() + b"\n", 0)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody can take over a file being removed
        os.close(self.fd)
        self.fd = None
        if self.created:  # a directory made only for the lock (the run failed its checks) goes again
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} (started {started}: {holder.get('command', '?')})"
