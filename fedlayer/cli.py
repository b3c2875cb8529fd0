"""``fedlayer`` command line: run | cleanup | partitions | compare | grid | report | deploy | config."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedlayer.config import Config, ConfigError, load_config, reference_markdown, to_toml
from fedlayer.deploy import add_deploy_parser, cmd_deploy
from fedlayer.inputs import (
    DEFAULT_CONFIG,
    Parser,
    add_config,
    add_out,
    check_before_start,
    check_out,
    load,
    report_bad_input,
)
from fedlayer.processes import exit_code, raise_signalled
from fedlayer.run.files import CHECKPOINT, CONFIG_RESOLVED

# What a resumed run may change: more rounds, another Ray cluster (neither changes the rounds already done).
RESUME_OVERRIDES = ("federation.rounds", "federation.ray_address")


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fedlayer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated experiment in Flower's simulation engine")
    add_config(run)
    add_out(run, "run directory (default: runs/<config>-<timestamp>)")
    run.add_argument("--overwrite", action="store_true", help="allow writing into an existing run directory")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last complete round (--set federation.rounds=N extends it)",
    )
    run.add_argument("--tensorboard", action="store_true", help="per-round scalars to RUN_DIR/tensorboard")
    cleanup = sub.add_parser("cleanup", help="stop the processes a killed run left running (its private Ray)")
    cleanup.add_argument("run_dir", metavar="RUN_DIR")
    parts = sub.add_parser("partitions", help="partition the data as configured and write partition.json/png")
    add_config(parts)
    add_out(parts, "output directory: new, empty or a previous partitions output", default="runs/partitions")
    parts.add_argument(
        "--export",
        metavar="DIR",
        help="also write each partition as images: DIR/partition-<i>/{train,test}/<class>/<index>.png",
    )
    _add_compare_parsers(sub)
    add_deploy_parser(sub)
    config = sub.add_parser("config", help="print the resolved config as TOML (--reference: every key)")
    add_config(config)
    config.add_argument(
        "--reference", action="store_true", help="print every key, type, default and meaning as markdown"
    )
    return parser


def _add_compare_parsers(sub: Any) -> None:
    cmp = sub.add_parser("compare", help="run strategies x seeds and write a table, plots and a report")
    add_config(cmp, optional=False)
    cmp.add_argument("--strategies", required=True, help="comma-separated: fedavg,fedper,partial[conv1+fc2]")
    cmp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    add_out(cmp, "compare directory, new or one to resume (default: runs/compare-<config>)")
    cmp.add_argument("--tensorboard", action="store_true", help="per-round TensorBoard logs in every run")
    grid = sub.add_parser(
        "grid", help="run strategies x seeds x named settings (a grid TOML) and write a matrix and a report"
    )
    grid.add_argument("grid", help="grid TOML: a base experiment plus [grid] strategies, seeds, settings")
    grid.add_argument("--strategies", help="comma-separated; replaces the grid file's list")
    grid.add_argument("--seeds", help="comma-separated seeds; replace the grid file's list")
    grid.add_argument("--settings", help="comma-separated setting names: run only these")
    grid.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value in every cell (after the setting's own overrides; repeatable)",
    )
    add_out(grid, "grid directory, new or one to resume (default: runs/grid-<grid file>)")
    rep = sub.add_parser("report", help="re-render plots and report of a run, compare or grid directory")
    rep.add_argument("dir", help="run, compare or grid directory")


def _default_out(config_path: str) -> Path:
    return Path("runs") / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_run(args: argparse.Namespace) -> int:
    """One run, holding the run directory's lock throughout; exit 128 + signal number after Ctrl-C."""
    if args.resume:
        flag, path = "--resume", _resume_dir(args)
    else:
        cfg = load(args)  # validated before torch, Flower and Ray are imported: a bad input fails in < 1 s
        flag, path = "--out", check_out(args.out or _default_out(args.config))
    with _locked(flag, path):  # first: a second run into `path` fails at once, before the slow checks
        if args.resume:
            cfg, run = _resumed(args, path)
        check_before_start(cfg)
        if not args.resume:
            from fedlayer.run.rundir import RunDir

            run = RunDir.create(path, overwrite=args.overwrite)
        try:
            signum = _simulate_with_progress(cfg, run, args)
        except Exception as err:
            if (failure := _run_failure(err)) is None:
                raise
            full = "no space left" in str(failure)  # here or in a client's reply (on the same disk)
            print(
                f"fedlayer: error: {failure}; {_continue(run, 'free space, then' if full else '')}",
                file=sys.stderr,
            )
            return 1
    if signum:
        print(_interrupted_line(run), file=sys.stderr)
        return 128 + signum
    from fedlayer.run.progress import fault_summary

    print(f"run directory: {run.path}")
    rows = run.read_jsonl()
    print(_final_line(rows[-1]))
    if summary := fault_summary(rows):
        logging.getLogger(__name__).warning(summary)
    return 0


def _simulate_with_progress(cfg: Config, run: Any, args: argparse.Namespace) -> int:
    """The simulation with a progress bar; the number of the signal that stopped it, else 0."""
    from fedlayer.run.progress import RoundProgress
    from fedlayer.run.rundir import TensorBoardLog
    from fedlayer.simulation import Interrupted, simulate

    try:
        with (
            RoundProgress(cfg.federation.rounds) as progress,
            TensorBoardLog(run, enabled=args.tensorboard) as tb,
        ):

            def on_round(row: dict[str, Any]) -> None:
                progress.update(row)
                tb.add(row)

            simulate(cfg, run, on_round, resume=bool(args.resume))
    except Interrupted as stop:
        signum = stop.signum
    except KeyboardInterrupt as stop:  # before the simulation took over SIGINT / SIGTERM
        signum = exit_code(stop) - 128
    else:
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopped already: more Ctrl-C would only garble the exit
    return signum


def _interrupted_line(run: Any) -> str:
    if run.file(CHECKPOINT).exists():
        return f"fedlayer: interrupted; {_continue(run)}"
    return f"fedlayer: interrupted before the first round completed; {_continue(run)}"


def _continue(run: Any, first: str = "") -> str:
    """How to go on with ``run``: resume from its checkpoint, or start it again."""
    then = f"{first} " if first else ""
    if run.file(CHECKPOINT).exists():
        return f"the last complete round is saved, {then}continue with: fedlayer run --resume {run.path}"
    return f"nothing to resume in {run.path}; to start again, {then}run the same command with --overwrite"


@contextmanager
def _locked(flag: str, path: Path) -> Iterator[None]:
    """Hold the run directory's lock (exit 2 naming ``flag`` when another live run holds it)."""
    from fedlayer.processes import LockHeld, RunLock

    try:
        lock = RunLock(path).acquire()
    except LockHeld as err:
        raise ConfigError(
            f"{flag}: run directory {str(path)!r} is in use by {err}; wait for that run or stop it"
        ) from None
    except OSError as err:
        raise ConfigError(f"{flag}: cannot use {str(path)!r} as a run directory: {err.strerror}") from None
    try:
        yield
    finally:
        lock.release()


def _resume_dir(args: argparse.Namespace) -> Path:
    """RUN_DIR of ``--resume``, checked to be a run directory before anything is locked or read."""
    if args.out or args.overwrite:
        raise ConfigError("--resume: continues RUN_DIR in place; drop --out / --overwrite")
    for item in args.overrides:
        if item.partition("=")[0].strip() not in RESUME_OVERRIDES:
            raise ConfigError(
                f"--set {item!r}: with --resume only {' and '.join(RESUME_OVERRIDES)} may change"
            )
    path = Path(args.resume)
    if not (path / CONFIG_RESOLVED).is_file():
        raise ConfigError(f"--resume: {args.resume!r} is not a run directory (no {CONFIG_RESOLVED})")
    return path


def _resumed(args: argparse.Namespace, path: Path) -> tuple[Config, Any]:
    """The run's own config (see ``RESUME_OVERRIDES``) and its directory, checkpoint readable."""
    from fedlayer.run.rundir import RunDir
    from fedlayer.server.checkpoint import load_checkpoint

    run = RunDir(path)
    cfg = load_config(run.file(CONFIG_RESOLVED), args.overrides)
    done = load_checkpoint(run).round
    if done >= cfg.federation.rounds:
        raise ConfigError(
            f"--resume: {args.resume!r} already completed {done} of federation.rounds="
            f"{cfg.federation.rounds}; pass --set federation.rounds=N with N > {done}"
        )
    return cfg, run


def _final_line(row: dict[str, Any]) -> str:
    keys = ("global_acc", "personalized_acc", "personalized_acc_worst10", "train_loss")
    return (
        "final round " + str(row["round"]) + ": " + ", ".join(f"{k} {row[k]:.4f}" for k in keys if k in row)
    )


def cmd_partitions(args: argparse.Namespace) -> int:
    cfg = load(args)
    out = check_out(
        args.out,
        reusable=lambda names: all(name.startswith("partition") for name in names),
        reusable_is="a previous partitions output",
    )
    from fedlayer.experiment import federated_data
    from fedlayer.run.rundir import RunDir

    export = Path(args.export) if args.export else None
    if export is not None and export.exists() and (not export.is_dir() or any(export.iterdir())):
        raise ConfigError(f"--export: {str(export)!r} exists and is not an empty directory; choose a new one")
    data = federated_data(cfg)
    run = RunDir.create(out, overwrite=True)
    data.write_partition_report(run.path, cfg.data.partitioner)
    _print_sizes(data.splits)
    print(f"written: {run.file('partition.json')}, {run.file('partition.png')}")
    if export is not None:
        _export(cfg, data, export)
    return 0


def _print_sizes(splits: Sequence[Any]) -> None:
    """One line per client, or a summary beyond the clients a bar plot shows."""
    import numpy as np

    from fedlayer.data import BAR_PLOT_CLIENTS, empty_partitions

    sizes = np.array([(len(s.train_idx), len(s.test_idx)) for s in splits])
    if len(sizes) <= BAR_PLOT_CLIENTS:
        for pid, (train, test) in enumerate(sizes):
            print(f"client {pid}: {train} train / {test} test")
    else:
        low, median, high = np.quantile(sizes[:, 0], [0, 0.5, 1])
        print(f"{len(sizes)} clients: train samples min {low:.0f}, median {median:.0f}, max {high:.0f}")
    if empty := empty_partitions(list(splits)):
        print(f"{len(empty)} clients hold fewer than 2 samples and would be left out of a run")


def _export(cfg: Config, data: Any, out: Path) -> None:
    """``--export DIR``: every partition in the ImageFolder layout a SuperNode's ``data-dir`` reads."""
    from fedlayer.data.folder import export_partition

    for split in data.splits:
        train, test = data.client(split.partition_id)
        folder = out / f"partition-{split.partition_id}"
        export_partition(train, test, cfg.data.dataset, cfg.data.normalize, folder)
    print(f"exported {len(data.splits)} partitions: {out}/partition-<i>/{{train,test}}/<class>/<index>.png")


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Stop what a killed run left running (``fedlayer run`` and ``--resume`` of RUN_DIR do it too)."""
    from fedlayer.run.rundir import RunDir
    from fedlayer.simulation import stop_leftovers

    path = Path(args.run_dir)
    if not path.is_dir():
        raise ConfigError(f"RUN_DIR: {args.run_dir!r} is not a directory")
    with _locked("RUN_DIR", path):
        stopped = stop_leftovers(RunDir(path))
    print(f"stopped what the run in {path} left: {stopped}" if stopped else f"nothing left running by {path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """The resolved config as TOML, or the reference of every key."""
    if not args.reference:
        print(to_toml(load(args)), end="")
    elif args.config != DEFAULT_CONFIG or args.overrides:
        raise ConfigError("--reference: lists every key and its default; drop CONFIG and --set")
    else:
        print(reference_markdown(), end="")
    return 0


def _compare_command(name: str, module: str = "fedlayer.compare") -> Callable[[argparse.Namespace], int]:
    """compare / grid / report, imported when used: their plotting and table libraries slow every other
    command."""

    def command(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    return command


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "cleanup": cmd_cleanup,
    "partitions": cmd_partitions,
    "compare": _compare_command("cmd_compare"),
    "grid": _compare_command("cmd_grid", "fedlayer.grid"),
    "report": _compare_command("cmd_report"),
    "deploy": cmd_deploy,
    "config": cmd_config,
}


class _ConsoleWarnings(logging.Handler):
    """fedlayer's warnings (``logging.getLogger("fedlayer...")``) as ``fedlayer: warning: ...`` on stderr,
    looked up per line: above a progress bar while one is shown."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"fedlayer: warning: {record.getMessage()}", file=sys.stderr)


def _warnings_to_console() -> None:
    logger = logging.getLogger("fedlayer")
    if not any(isinstance(h, _ConsoleWarnings) for h in logger.handlers):
        logger.addHandler(_ConsoleWarnings(logging.WARNING))
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage statistics from Flower / flwr-datasets
    args = _parser().parse_args(argv)
    _warnings_to_console()
    sigterm = signal.signal(signal.SIGTERM, raise_signalled)  # as Ctrl-C, wherever the command is
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:  # config values, flags, files, data, layer selectors
        return report_bad_input(err)
    except KeyboardInterrupt as stop:
        print("fedlayer: interrupted", file=sys.stderr)
        return exit_code(stop)
    except Exception as err:
        failed = _run_failure(err)
        if failed is None:
            raise
        print(f"fedlayer: error: {failed}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def _run_failure(err: BaseException | None) -> BaseException | None:
    """What ended a command, behind Flower's wrapping, when it is one line for the user: too few valid
    client updates (RoundFailedError), a full disk (NoSpaceLeft)."""
    from fedlayer.run.atomic import NoSpaceLeft
    from strategies.mechanism import RoundFailedError

    while err is not None and not isinstance(err, RoundFailedError | NoSpaceLeft):
        err = err.__cause__ or err.__context__
    return err


if __name__ == "__main__":
    sys.exit(main())
