"""Run a federation in Flower's simulation engine (Ray backend), in this process.

Entry point: Flower's in-process simulation (:func:`fedlayer.flower.run_in_process`, deprecated in Flower 1.42
in favour of ``flwr run``, which runs the ServerApp in a process spawned by a detached SuperLink; fedlayer
needs the ServerApp in this process: per-round progress, Ctrl-C that stops cleanly, nothing left running). Its
deprecation banner (like Ray's start-up warning) goes to the run's ``flower.log``, not the console.

Ray: a private local instance (``federation.ray_address = ""``, the default), or a running cluster
(``"auto"`` or ``"HOST:PORT"``; ``RAY_ADDRESS`` counts as the same setting). A private instance is recorded
in ``RUN_DIR/ray_session.json`` while it runs, so that whatever a killed run leaves behind can be stopped
later (:func:`stop_leftovers`); a joined cluster is never shut down.

Memory: the process caps glibc's malloc arenas at :data:`MALLOC_ARENAS` before Ray starts its threads (see
:func:`limit_malloc_arenas`).

Ctrl-C (SIGINT) or SIGTERM: the ServerApp stops at its next wait for clients, running client jobs are
stopped, Ray is shut down, and :class:`Interrupted` is raised; the checkpoint of the last complete round
stays in the run directory.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlayer import flower, processes
from fedlayer.config import Config, ConfigError
from fedlayer.run.files import SESSION_FILE
from fedlayer.run.rundir import RunDir
from fedlayer.server.observers import RoundCallback

# Messages up to this size travel inline with the task, not through Ray's shared-memory object store: the
# server process maps every store page a message ever used, so its RSS grew ~0.3 MiB per round
# (RssShmem, bench/memory.py). Bigger messages (e.g. ResNet-18 models) still use the store.
INLINE_MESSAGES = {"max_direct_call_object_size": 16 * 2**20, "task_rpc_inlined_bytes_limit": 16 * 2**20}

CLIENT_ACTOR = "ray::ClientAppActor"  # process title of Flower's client actors (Ray: "ray::<class>")


class Interrupted(Exception):
    """The run was stopped by a signal (Ctrl-C); its last complete round is checkpointed."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class StopRequest:
    """Set by the signal handler (main thread), checked by the ServerApp thread."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0

    def request(self, signum: int) -> None:
        self.signum = self.signum or signum
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def check(self) -> None:
        if self.event.is_set():
            raise Interrupted(self.signum)


def ray_address(cfg: Config) -> str:
    """The Ray cluster to join ("" = start a private local Ray)."""
    return cfg.federation.ray_address or os.environ.get("RAY_ADDRESS", "")


def check_ray_address(cfg: Config) -> None:
    """A cluster to join must be reachable: Ray itself retries an unreachable address for minutes."""
    address = ray_address(cfg)
    if address in ("", "auto"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"federation.ray_address (or RAY_ADDRESS): {address!r} is not allowed; "
            'use "" (a private local Ray), "auto" or "HOST:PORT" of a running cluster\'s head'
        )
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise ConfigError(
            f"federation.ray_address (or RAY_ADDRESS): no Ray cluster answers at {address!r} "
            f"({err.strerror or err}); start one with `ray start --head --port PORT`"
        ) from None


def backend_config(cfg: Config) -> dict[str, object]:
    """Ray resources: each client actor asks for ``client_cpus`` / ``client_gpus`` (checked to fit by
    :func:`fedlayer.config.check_gpus` before the run starts).

    A private Ray gets this machine's CPUs and GPUs; a joined cluster brings its own (``ray.init`` refuses
    resources when connecting).
    """
    f = cfg.federation
    init: dict[str, object] = {"logging_level": logging.ERROR, "log_to_driver": False}
    if not ray_address(cfg):  # a joined cluster brings its own resources and system config
        init |= {
            "num_cpus": os.cpu_count() or 1,
            "num_gpus": available_gpus(),
            "include_dashboard": False,
            "_system_config": INLINE_MESSAGES,
        }
    return {"client_resources": {"num_cpus": f.client_cpus, "num_gpus": f.client_gpus}, "init_args": init}


# ClientApps that moved: a run directory written before the move still resumes (its config names them).
MOVED_CLIENT_APPS = {"fedlayer.client_app:app": "fedlayer.client.app:app"}


def load_client_app(reference: str) -> ClientApp:
    """The ClientApp at ``module:attribute`` (``federation.client_app``)."""
    module, _, attribute = MOVED_CLIENT_APPS.get(reference, reference).partition(":")
    try:
        app = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"federation.client_app: cannot load {reference!r} ({err})") from None
    if not isinstance(app, ClientApp):
        raise ConfigError(f"federation.client_app: {reference!r} is not a flwr ClientApp")
    return app


def available_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def simulate(
    cfg: Config, run: RunDir, on_round: RoundCallback | None = None, *, resume: bool = False
) -> None:
    """Run ``cfg`` with ``federation.clients`` virtual SuperNodes; raises if the ServerApp fails.

    ``resume`` continues ``run`` from its checkpoint. Raises :class:`Interrupted` after a clean stop on
    SIGINT / SIGTERM.
    """
    from fedlayer.server.app import log_flower_to, run_server

    client_app = load_client_app(cfg.federation.client_app)
    stop = StopRequest()
    server_app = ServerApp()
    session: RaySession | None = None

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            run_server(
                grid,
                cfg,
                run,
                on_round,
                resume=resume,
                client_state=True,
                interrupt=stop.check,
            )
        except Interrupted:
            if session is not None:
                session.stop_clients()  # else Flower waits for the running client jobs to finish
            raise

    log_flower_to(run)
    limit_malloc_arenas()
    if stopped := stop_leftovers(run):
        log(logging.INFO, "fedlayer: stopped what a killed run left: %s", stopped)
    backend = backend_config(cfg)
    with _signals_stop(stop), _console_quiet(stop), flower.deliver_to_waiting_nodes():
        session = _start_ray(ray_address(cfg), backend["init_args"], run)  # type: ignore[arg-type]
        try:
            stop.check()  # Ctrl-C while Ray started
            flower.run_in_process(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.federation.clients,
                backend_config=backend,
            )
        except Exception:
            if not stop.is_set():
                raise
            log(logging.INFO, "fedlayer: stopped by %s", signal.Signals(stop.signum).name)
            raise Interrupted(stop.signum) from None
        finally:
            _stop_ray(session, run)


@dataclass
class RaySession:
    """The private Ray instance of a run (``None`` where fedlayer joined a cluster it must not stop)."""

    record: processes.ProcessRecord

    def stop_clients(self) -> None:
        """Stop the client actors' processes (Flower's actor class): their running jobs end at once."""
        actors = processes.named(self.record.alive(), CLIENT_ACTOR)
        log(logging.INFO, "fedlayer: stopping %d client actors", len(actors))
        processes.terminate_all(actors, grace=2.0)


MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # mallopt's parameter number, glibc's malloc.h


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap the malloc arenas that threads started from now on may create (glibc only; True if set).

    By default glibc gives threads up to 8 arenas per core. In this process the 20 replies of a round
    (~130 MiB) are allocated and freed by Ray's, gRPC's and Python's threads across those arenas, and the
    free memory that fragmentation leaves in them grows the RSS for ~150 rounds (200 rounds at 100 clients:
    0.12 and 0.18 MiB/round; capped here 0.10 and ~110 MiB less; ``bench/RESULTS.md``, Scale).
    ``MALLOC_ARENA_MAX`` in the environment is the user's choice and is left as it is.
    """
    import ctypes

    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


def _start_ray(address: str, init_args: dict[str, object], run: RunDir) -> RaySession | None:
    """Start a private Ray (recorded in the run directory) or join ``address``.

    Started before Flower would: the ServerApp thread may create the analysis actor before Flower's
    backend initialises Ray, and Flower uses a running Ray as it is.
    """
    import ray

    # Ray's FutureWarning about accelerator env vars is advice for Ray's next release, not for the user.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            context = ray.init(address=address or "local", **init_args)  # type: ignore[arg-type]
        except (ConnectionError, ValueError) as err:
            if not address:
                raise
            raise ConfigError(
                f"federation.ray_address (or RAY_ADDRESS): cannot join the Ray cluster at {address!r} "
                f'({err}); start it with `ray start --head`, or use "" for a private local Ray'
            ) from err
    for warning in caught:
        log(logging.INFO, "ray: %s", warning.message)
    if address:
        log(logging.INFO, "fedlayer: joined the Ray cluster at %s", address)
        return None
    session_dir = str(context.address_info["session_dir"])  # type: ignore[attr-defined]  # RayContext
    record = processes.ProcessRecord(
        processes.ProcessId.current(),
        session_dir,
        processes.ids(processes.using(session_dir)),
    )
    record.save(run.file(SESSION_FILE))
    return RaySession(record)


def _stop_ray(session: RaySession | None, run: RunDir) -> None:
    """Disconnect from Ray; a private instance is shut down and checked to be gone."""
    import ray

    ray.shutdown()
    if session is not None:
        left = session.record.alive()
        if left:  # what ray.shutdown did not stop
            log(logging.INFO, "fedlayer: stopping what Ray's shutdown left: %s", processes.describe(left))
        processes.terminate_all(left)
        run.file(SESSION_FILE).unlink(missing_ok=True)


def stop_leftovers(run: RunDir) -> str:
    """Stop what a killed run in ``run`` left running (its private Ray's processes); returns what it
    stopped ("name (pid), ..."; "" for nothing).

    Does nothing while that run's process is alive, and never touches another session's processes.
    """
    path = run.file(SESSION_FILE)
    record = processes.ProcessRecord.load(path)
    if record is None or record.owner.alive():
        return ""
    left = record.leftovers()
    stopped = processes.describe(left) if left else ""
    processes.terminate_all(left)
    path.unlink(missing_ok=True)
    return stopped


@contextmanager
def _signals_stop(stop: StopRequest) -> Iterator[None]:
    """SIGINT and SIGTERM request a stop instead of raising in whatever the main thread is waiting on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.request(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _ConsoleFilter(logging.Filter):
    """Flower's console output: warnings and errors, minus its deprecation banner, and nothing once a
    stop is requested (the teardown's errors are expected); ``flower.log`` keeps everything."""

    def __init__(self, stop: StopRequest) -> None:
        super().__init__()
        self.stop = stop

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.stop.is_set() or str(record.msg).startswith("DEPRECATED FEATURE"))


@contextmanager
def _console_quiet(stop: StopRequest) -> Iterator[None]:
    handlers = [h for h in logging.getLogger("flwr").handlers if not isinstance(h, logging.FileHandler)]
    quiet, levels = _ConsoleFilter(stop), [h.level for h in handlers]
    for handler in handlers:
        handler.addFilter(quiet)
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels, strict=True):
            handler.removeFilter(quiet)
            handler.setLevel(level)
