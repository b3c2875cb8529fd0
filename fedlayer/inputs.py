"""Command-line inputs every ``fedlayer`` command shares: CONFIG + ``--set``, ``--out``, and the checks that
run before anything starts.

Checking is in two steps so that a bad input costs well under a second: :func:`load` and :func:`check_out`
need only the standard library; :func:`check_before_start` (data, partitions, layer selectors, GPU shares)
imports torch and runs only on a config that loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from fedlayer.config import DEFAULT_EXPERIMENT, Config, ConfigError, check_gpus, load_config

EXIT_BAD_INPUT = 2
DEFAULT_CONFIG = DEFAULT_EXPERIMENT


class Parser(argparse.ArgumentParser):
    """argparse with the one-line errors (exit code 2) of every other bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config(parser: argparse.ArgumentParser, *, optional: bool = True) -> None:
    """CONFIG (an experiment TOML) and repeatable ``--set KEY=VALUE`` overrides."""
    if optional:
        parser.add_argument(
            "config", nargs="?", default=DEFAULT_CONFIG, help=f"experiment TOML ({DEFAULT_CONFIG})"
        )
    else:
        parser.add_argument("config", help="experiment TOML")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set federation.rounds=3 (repeatable; values are TOML)",
    )


def add_out(parser: argparse.ArgumentParser, meaning: str, default: str | None = None) -> None:
    parser.add_argument("--out", default=default, help=meaning)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (the flag is named by argparse in the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; must be >= 1")
    return value


def load(args: argparse.Namespace) -> Config:
    """The config of ``args.config`` with ``args.overrides`` applied, validated."""
    return load_config(args.config, args.overrides)


def check_out(
    path: str | Path,
    flag: str = "--out",
    *,
    reusable: Callable[[list[str]], bool] | None = None,
    reusable_is: str = "",
) -> Path:
    """``path`` is a directory that exists or can be created and written (nothing is left behind).

    With ``reusable``, an existing non-empty directory must be what the command may write into again:
    ``reusable(names of its entries)`` is true; ``reusable_is`` says what that is, for the error.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag}: {str(path)!r} is a file; give a directory")
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir():
        raise ConfigError(f"{flag}: {str(parent)!r} is a file, so {str(path)!r} cannot be created")
    try:  # os.access says yes to root even where nothing can be created (/proc)
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as err:
        raise ConfigError(
            f"{flag}: cannot create {str(path)!r}: {str(parent)!r} is not writable ({err.strerror})"
        ) from None
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if reusable is not None and names and not reusable(names):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ConfigError(
            f"{flag}: {str(path)!r} holds other files ({shown}); "
            f"give a new or empty directory or {reusable_is}"
        )
    return path


def check_before_start(cfg: Config) -> None:
    """What would otherwise fail inside a run, after Ray and Flower started: GPU shares, data, partitions,
    the algorithm's layer selectors (and ``lmc``'s) against the model. One-line ConfigErrors (data and
    selector errors included)."""
    import torch

    from fedlayer.experiment import federated_data, initial_model
    from fedlayer.server.app import shared_layers, sharing_policy
    from fedlayer.server.nodes import excluded_partitions
    from fedlayer.simulation import check_ray_address, load_client_app, ray_address
    from strategies.algorithms import get_algorithm

    check_ray_address(cfg)
    if not ray_address(cfg):  # a joined Ray cluster brings its own CPUs and GPUs
        check_gpus(cfg, torch.cuda.device_count(), os.cpu_count() or 1)
    load_client_app(cfg.federation.client_app)
    data = federated_data(cfg)
    excluded_partitions(cfg, data)
    model = initial_model(cfg, data.test, get_algorithm(cfg.strategy).extension)
    sharing_policy(cfg, model, shared_layers(cfg, model))


def report_bad_input(err: ConfigError) -> int:
    print(f"fedlayer: error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT
