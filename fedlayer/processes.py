"""Process trees (psutil): stop a process with every descendant, and find what a dead one left behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence

import psutil


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
    procs: Sequence[subprocess.Popen[bytes]], grace: float = 10.0, *, also: Iterable[psutil.Process] = ()
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
        signal_group(proc.pid, signal.SIGTERM)
    for member in family.values():
        with contextlib.suppress(psutil.Error):
            member.terminate()
    deadline = time.monotonic() + grace
    for proc in live:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for proc in live:
        if proc.poll() is None:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    stop(family.values(), timeout=max(0.1, deadline - time.monotonic()))


def stop(procs: Iterable[psutil.Process], timeout: float = 10.0) -> None:
    """Wait up to ``timeout`` s for ``procs`` to be gone (reaped), SIGKILL the rest and wait for them."""
    _, alive = psutil.wait_procs(list(procs), timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid`` (nothing if it is gone)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
