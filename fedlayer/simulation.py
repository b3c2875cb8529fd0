"""Run a federation in Flower's simulation engine (Ray backend), in this process."""

from __future__ import annotations

import importlib
import logging
import os
import warnings

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedlayer.config import Config, ConfigError
from fedlayer.results import RoundCallback, RunDir

# Messages up to this size travel inline with the task, not through Ray's shared-memory object store: the
# server process maps every store page a message ever used, so its RSS grew ~0.3 MiB per round
# (RssShmem, bench/memory.py). Bigger messages (e.g. ResNet-18 models) still use the store.
INLINE_MESSAGES = {"max_direct_call_object_size": 16 * 2**20, "task_rpc_inlined_bytes_limit": 16 * 2**20}


def backend_config(cfg: Config) -> dict[str, object]:
    """Ray resources: each client actor asks for ``client_cpus`` / ``client_gpus`` (checked to fit by
    :func:`fedlayer.config.check_gpus` before the run starts)."""
    f = cfg.federation
    init = {
        "num_cpus": os.cpu_count() or 1,
        "num_gpus": available_gpus(),
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": False,
        "_system_config": INLINE_MESSAGES,
    }
    return {"client_resources": {"num_cpus": f.client_cpus, "num_gpus": f.client_gpus}, "init_args": init}


def load_client_app(reference: str) -> ClientApp:
    """The ClientApp at ``module:attribute`` (``federation.client_app``)."""
    module, _, attribute = reference.partition(":")
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

    ``resume`` continues ``run`` from its checkpoint.
    """
    from flwr.simulation import run_simulation

    from fedlayer.server_app import run_server

    client_app = load_client_app(cfg.federation.client_app)

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, run, on_round, resume=resume, client_state=True)

    _log_flower_to(run)
    backend = backend_config(cfg)
    _start_ray(backend["init_args"])  # type: ignore[arg-type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.federation.clients,
                backend_config=backend,  # type: ignore[arg-type]
            )
    finally:
        import ray

        ray.shutdown()


def _start_ray(init_args: dict[str, object]) -> None:
    """Start Ray before Flower does: the ServerApp thread may create the analysis actor before Flower's
    backend would initialise Ray, and Flower uses a running Ray as it is."""
    import ray

    if not ray.is_initialized():
        ray.init(**init_args)  # type: ignore[arg-type]


def _log_flower_to(run: RunDir) -> None:
    """Flower's INFO log goes to the run directory; the console keeps warnings and the progress bar."""
    logger = logging.getLogger("flwr")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler) or getattr(handler, "_fedlayer", False):
            logger.removeHandler(handler)
    for handler in logger.handlers:
        handler.setLevel(logging.WARNING)
    file_handler = logging.FileHandler(run.file("flower.log"))
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(file_handler)
    logger.setLevel(logging.INFO)
