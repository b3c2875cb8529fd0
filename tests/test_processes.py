"""fedlayer.processes with real processes and signals: run-directory lock, records of what a run started."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from fedlayer.processes import (
    LOCK_FILE,
    LockHeld,
    ProcessId,
    ProcessRecord,
    RunLock,
    terminate,
    terminate_all,
)

ROOT = Path(__file__).resolve().parents[1]
# `make test` runs these after the others, one at a time (they watch processes, signals or ports).
pytestmark = pytest.mark.serial
HOLD_LOCK = """
import sys, time
from pathlib import Path
from fedlayer.processes import RunLock
RunLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(120)
"""
# An owner that starts a helper keeping a file open under a directory (as Ray's agents keep their logs), then
# waits; killing the owner orphans the helper, as SIGKILL of `fedlayer run` orphans Ray's agents.
OWNER = """
import subprocess, sys, time
keep_open = "import sys, time; f = open(sys.argv[1], 'a'); print('open', flush=True); time.sleep(120)"
helper = subprocess.Popen([sys.executable, "-c", keep_open, sys.argv[1]], stdout=subprocess.PIPE, text=True)
helper.stdout.readline()
print(helper.pid, flush=True)
time.sleep(120)
"""


Spawn = Callable[..., tuple[subprocess.Popen[str], str]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start ``python -c CODE ARGS``; waits for its first output line; everything is killed afterwards."""
    started: list[subprocess.Popen[str]] = []

    def run(code: str, *args: str) -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        started.append(proc)
        assert proc.stdout is not None
        return proc, proc.stdout.readline().strip()

    yield run
    terminate(started, grace=1)


def test_lock_is_exclusive_and_a_killed_holders_lock_is_taken_over(tmp_path: Path, spawn: Spawn) -> None:
    holder, said = spawn(HOLD_LOCK, str(tmp_path))
    assert said == "locked"
    with pytest.raises(LockHeld, match=rf"pid {holder.pid} "):
        RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).exists(), "a killed holder cannot remove its lock file"
    with RunLock(tmp_path) as lock:
        assert lock.stale is not None and lock.stale["pid"] == holder.pid
        with pytest.raises(LockHeld, match=rf"pid {psutil.Process().pid} "):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_is_released_when_the_block_fails(tmp_path: Path) -> None:
    new = tmp_path / "new"
    with pytest.raises(RuntimeError), RunLock(new):
        raise RuntimeError("a bad config")
    assert not new.exists(), "a directory made only for the lock goes again"
    RunLock(tmp_path).acquire().release()


def test_leftovers_are_only_the_dead_owners_processes(tmp_path: Path, spawn: Spawn) -> None:
    marker, decoy_dir = tmp_path / "session_1", tmp_path / "session_12"  # a name that starts with the marker
    marker.mkdir()
    decoy_dir.mkdir()
    owner, helper_pid = spawn(OWNER, str(marker / "agent.log"))
    decoy, _ = spawn(OWNER, str(decoy_dir / "agent.log"))
    record = ProcessRecord(ProcessId.of(psutil.Process(owner.pid)), str(marker))
    assert record.leftovers() == [], "nothing is left over while the owner runs"
    assert {p.pid for p in record.alive()} == {owner.pid, int(helper_pid)}  # named on its command line
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    left = record.leftovers()
    assert [p.pid for p in left] == [int(helper_pid)]
    assert left[0].ppid() != owner.pid  # orphaned, as Ray's agents after a SIGKILL
    terminate_all(left, grace=2)
    assert record.alive() == []
    assert psutil.Process(decoy.pid).is_running()


def test_a_recycled_pid_is_not_the_recorded_process() -> None:
    me = ProcessId.current()
    assert me.alive()
    assert not ProcessId(me.pid, me.started - 100).alive()


@pytest.mark.parametrize("own_session", [False, True])
def test_terminate_stops_a_child_whether_or_not_it_leads_a_process_group(own_session: bool) -> None:
    sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(120)"]
    proc = subprocess.Popen(sleeper, stdout=subprocess.PIPE, text=True, start_new_session=own_session)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    terminate([proc], grace=10)
    assert proc.returncode == -signal.SIGTERM, "stopped by the SIGTERM, not by its sleep running out"
