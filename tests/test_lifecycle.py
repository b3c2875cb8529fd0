"""A run's process lifecycle, with real runs and real signals: Ctrl-C, the run-directory lock, a damaged
checkpoint, and what a SIGKILLed run leaves running."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from flwr.app import Array, ArrayRecord
from sim_helpers import (
    ROOT,
    assert_same_model,
    cli_args,
    env,
    is_ray_agent,
    metrics,
    run,
    start,
    wait_for_rows,
)

from fedlayer.cli import _interrupted_line, main
from fedlayer.config import load_config, to_toml
from fedlayer.processes import ProcessRecord
from fedlayer.run.atomic import NoSpaceLeft
from fedlayer.run.files import CHECKPOINT, LOCK_FILE, SESSION_FILE
from fedlayer.run.rundir import RunDir, save_arrays

CLI = [sys.executable, "-m", "fedlayer.cli"]
# `make test` runs these after the others, one at a time (they watch processes, signals or ports).
pytestmark = pytest.mark.serial


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env())


def tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_resume_of_a_damaged_checkpoint_is_one_line_and_touches_nothing(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(ROOT / "experiments" / "default.toml", ["federation.rounds=3"])
    (tmp_path / "config.resolved.toml").write_text(to_toml(cfg))
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    (tmp_path / "clients" / "partition-0").mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, tmp_path / "clients" / "partition-0" / "round-000002.pt")
    torch.save({"round": 2, "arrays": {"w": torch.ones(1000)}}, tmp_path / CHECKPOINT)
    whole = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(b"" if damage == "empty" else whole[: len(whole) // 2])
    before = files(tmp_path)

    assert main(["run", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(tmp_path / CHECKPOINT) in err[0]
    assert "is damaged" in err[0] and "start over" in err[0] and "config.resolved.toml --out" in err[0]
    assert files(tmp_path) == before  # same files, same bytes (and the lock file is gone again)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resuming_equals_the_uninterrupted_run(
    tiny_fmnist: Path, tmp_path: Path, uninterrupted: Path
) -> None:
    reference, stopped = uninterrupted, tmp_path / "stopped"
    proc = start(cli_args(tiny_fmnist, stopped), tmp_path / "stopped.log")
    try:
        wait_for_rows(stopped, 1, proc)
        started = tree(proc.pid)  # Ray's processes and the client actors
        assert any(p.name().startswith("ray::ClientAppActor") for p in started)
        for _ in range(2):  # an impatient user: a second Ctrl-C while the first one is being handled
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.3)
        proc.wait(timeout=300)
    except BaseException:  # only then: a clean stop must leave nothing for this to kill
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise

    output = (tmp_path / "stopped.log").read_text()
    assert proc.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "(raylet)" not in output, "Ray's reports of the actors the stop ended belong in flower.log"
    last = output.strip().splitlines()[-1]
    assert last == (
        "fedlayer: interrupted; the last complete round is saved, continue with: "
        f"fedlayer run --resume {stopped}"
    )
    done = torch.load(stopped / CHECKPOINT, weights_only=True)["round"]
    assert 1 <= done < 4
    assert running(started) == [], "Ray, its agents and the client actors are stopped"
    assert not (stopped / LOCK_FILE).exists() and not (stopped / SESSION_FILE).exists()

    run([*CLI, "run", "--resume", str(stopped)])
    assert metrics(stopped) == metrics(reference)
    assert_same_model(stopped / "model.pt", reference / "model.pt")


@pytest.mark.slow
def test_sigterm_stops_cleanly_with_exit_143_and_one_line(tiny_fmnist: Path, tmp_path: Path) -> None:
    """`kill PID`, `timeout`, systemd and `docker stop` send SIGTERM to the command's process only."""
    out = tmp_path / "run"
    proc = start(cli_args(tiny_fmnist, out), tmp_path / "run.log")
    try:
        wait_for_rows(out, 1, proc)
        started = tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    output = (tmp_path / "run.log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output and "SIGTERM received" not in output and "(raylet)" not in output
    assert output.strip().splitlines()[-1] == (
        f"fedlayer: interrupted; the last complete round is saved, continue with: fedlayer run --resume {out}"
    )
    assert running(started) == [], "Ray, its agents and the client actors are stopped"
    assert not (out / LOCK_FILE).exists() and not (out / SESSION_FILE).exists()


def test_an_interruption_before_the_first_round_says_how_to_start_again(tmp_path: Path) -> None:
    line = _interrupted_line(RunDir(tmp_path))
    assert line.endswith(
        f"nothing to resume in {tmp_path}; to start again, run the same command with --overwrite"
    )


@pytest.mark.extended  # `make test-all`, not CI: the lock itself is unit-tested
@pytest.mark.slow
def test_a_run_directory_in_use_refuses_a_second_run(tiny_fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = start(cli_args(tiny_fmnist, out, "federation.rounds=3"), tmp_path / "first.log")
    try:
        wait_for_rows(out, 1, first)
        first.send_signal(signal.SIGSTOP)  # holds `out` (and its lock) for as long as the checks take
        try:
            refused = [
                (subprocess.run([*cli_args(tiny_fmnist, out, "seed=1"), *extra], **_quick()), "--out")
                for extra in ([], ["--overwrite"])
            ]
            refused.append((subprocess.run([*CLI, "run", "--resume", str(out)], **_quick()), "--resume"))
        finally:
            first.send_signal(signal.SIGCONT)
        for proc, flag in refused:
            assert proc.returncode == 2, proc.stderr[-3000:]
            [line] = proc.stderr.strip().splitlines()
            assert line.startswith(f"fedlayer: error: {flag}: run directory ")
            assert f"in use by pid {first.pid} " in line
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert [row["round"] for row in metrics(out)] == [1, 2, 3]  # no rows of the refused runs
    assert "seed = 0" in (out / "config.resolved.toml").read_text()
    assert not (out / LOCK_FILE).exists()


def _quick() -> dict[str, object]:
    return {"cwd": ROOT, "capture_output": True, "text": True, "timeout": 300, "env": env()}


# `make test-all`, not CI: test_resume checks that --resume stops the leftovers, test_processes that only the
# dead owner's are
@pytest.mark.extended
@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_stopped_and_no_other_runs(tiny_fmnist: Path, tmp_path: Path) -> None:
    killed, other = tmp_path / "killed", tmp_path / "other"
    victim = start(cli_args(tiny_fmnist, killed), tmp_path / "killed.log")
    bystander = start(cli_args(tiny_fmnist, other, "federation.rounds=2"), tmp_path / "other.log")
    try:
        wait_for_rows(killed, 1, victim)
        victim.send_signal(signal.SIGKILL)  # the CLI process only, as the OOM killer or `kill -9 PID` would
        victim.wait()
        record = ProcessRecord.load(killed / SESSION_FILE)
        assert record is not None and not record.owner.alive()
        left = record.leftovers()
        assert any(map(is_ray_agent, left)), [p.cmdline() for p in left]
        assert (killed / LOCK_FILE).exists()
        wait_for_rows(other, 1, bystander)
        others = ProcessRecord.load(other / SESSION_FILE)
        assert others is not None
        core = [p for p in others.alive() if p.name() in ("gcs_server", "raylet")]
        assert len(core) == 2
        bystander.send_signal(signal.SIGSTOP)  # the other run stays mid-run while the cleanup runs
        try:
            cleanup = cli("cleanup", str(killed))  # takes over the killed run's stale lock
        finally:
            bystander.send_signal(signal.SIGCONT)
        assert cleanup.returncode == 0, cleanup.stderr[-3000:]
        assert cleanup.stdout.startswith(f"stopped what the run in {killed} left: ")
        agents = [p for p in left if is_ray_agent(p)]  # the rest (client actors) may exit by themselves
        assert all(f"({p.pid})" in cleanup.stdout for p in agents) and cleanup.stderr == ""
        assert record.alive() == []
        assert running(core) == core, "another run's Ray is never touched"
        assert bystander.wait(timeout=600) == 0, (tmp_path / "other.log").read_text()[-3000:]
    finally:
        for proc in (victim, bystander):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever a failed test leaves in the test's groups
    assert cli("cleanup", str(killed)).stdout.startswith("nothing left running")
    run([*CLI, "run", "--resume", str(killed)])
    assert [row["round"] for row in metrics(killed)] == [1, 2, 3, 4]
    assert not (killed / LOCK_FILE).exists()


@pytest.mark.parametrize("kind", ["text", "tensors"])
def test_a_full_disk_keeps_the_old_file_and_leaves_no_temporary_file(kind: str, tmp_path: Path) -> None:
    """ENOSPC from the kernel: the temporary file is a link to /dev/full (every write to it fails so)."""
    run_dir = RunDir(tmp_path)

    def write(value: float) -> None:
        if kind == "text":
            run_dir.write_json("summary.json", {"value": value})
        else:
            save_arrays(run_dir, CHECKPOINT, ArrayRecord({"w": Array(np.full(1000, value, np.float32))}))

    name = "summary.json" if kind == "text" else CHECKPOINT
    write(1.0)
    before = (tmp_path / name).read_bytes()
    (tmp_path / f"{name}.tmp").symlink_to("/dev/full")
    with pytest.raises(NoSpaceLeft) as failed:
        write(2.0)
    message = str(failed.value)
    assert message.startswith(f"cannot write {tmp_path / name}: no space left on ") and "MiB free" in message
    assert "\n" not in message
    assert (tmp_path / name).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@contextlib.contextmanager
def small_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real file system of ``size`` at ``mount`` (root only)."""
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=False)
    if made.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(path: Path) -> None:
    """Write ``path`` until its file system is full."""
    with open(path, "wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0")


@pytest.mark.extended  # `make test-all`, not CI: the file layer's ENOSPC handling is unit-tested above
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(
    tiny_fmnist: Path, tmp_path: Path
) -> None:
    """The run directory on a real 32 MB tmpfs that is filled up after round 1."""
    with small_tmpfs(tmp_path / "small", "32m") as mount:
        out = mount / "run"
        proc = start(cli_args(tiny_fmnist, out, "federation.rounds=2"), tmp_path / "run.log")
        try:
            wait_for_rows(out, 1, proc)
            proc.send_signal(signal.SIGSTOP)
            fill(mount / "filler")
            proc.send_signal(signal.SIGCONT)
            proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        output = (tmp_path / "run.log").read_text()
        assert proc.returncode == 1, output[-3000:]
        assert "Traceback" not in output and "Logging error" not in output
        last = output.strip().splitlines()[-1]
        assert last.startswith("fedlayer: error: ") and "no space left on tmpfs (mounted at " in last
        assert last.endswith(
            f"the last complete round is saved, free space, then continue with: fedlayer run --resume {out}"
        )
        assert [p for p in out.rglob("*") if ".tmp" in p.name] == []
        done = torch.load(out / CHECKPOINT, weights_only=True)["round"]
        assert done >= 1 and [row["round"] for row in metrics(out)] == list(range(1, done + 1))
        (mount / "filler").unlink()
        run([*CLI, "run", "--resume", str(out)])
        assert [row["round"] for row in metrics(out)] == [1, 2]
        assert not (out / LOCK_FILE).exists()


def test_console_log_has_no_colour_codes_off_a_terminal() -> None:
    from flwr.common.logger import console_handler

    from fedlayer import flower

    flower.colour_on_terminal_only()  # pytest's stderr is not a terminal
    record = logging.LogRecord("flwr", logging.WARNING, "", 0, "fedlayer: x", None, None)
    assert console_handler.format(record) == "WARNING :   fedlayer: x"


def test_the_ray_internals_the_simulation_replaces_are_there() -> None:
    """simulation._ray_errors_to_log swaps Ray's printer of raylet errors; a Ray upgrade must keep it."""
    from ray._private import worker

    assert callable(worker.print_to_stdstream) and callable(worker.listen_error_messages)
