"""``fedlayer`` command line: run | compare | report | deploy | partitions."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlayer.compare import add_parsers as add_compare_parsers
from fedlayer.compare import cmd_compare, cmd_report
from fedlayer.config import Config, ConfigError, check_gpus, load_config
from fedlayer.deploy import add_deploy_parser, cmd_deploy

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlayer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated experiment in Flower's simulation engine")
    run.add_argument("config", nargs="?", default="experiments/default.toml", help="experiment TOML")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set federation.rounds=3 (repeatable)",
    )
    run.add_argument("--out", help="run directory (default: runs/<config>-<timestamp>)")
    run.add_argument("--overwrite", action="store_true", help="allow writing into an existing run directory")
    run.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last complete round (--set federation.rounds=N extends it)",
    )
    parts = sub.add_parser("partitions", help="partition the data as configured and write partition.json/png")
    parts.add_argument("config", nargs="?", default="experiments/default.toml")
    parts.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parts.add_argument("--out", default="runs/partitions")
    run.add_argument("--tensorboard", action="store_true", help="per-round scalars to RUN_DIR/tensorboard")
    add_compare_parsers(sub)
    add_deploy_parser(sub)
    return parser


def _default_out(config_path: str) -> Path:
    return Path("runs") / f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_run(args: argparse.Namespace) -> int:
    from fedlayer.progress import RoundProgress
    from fedlayer.results import RunDir, TensorBoardLog
    from fedlayer.simulation import simulate

    if args.resume:
        cfg, run = _resumed(args)
        _check_before_start(cfg)
    else:
        cfg = load_config(args.config, args.overrides)
        _check_before_start(cfg)
        run = RunDir.create(args.out or _default_out(args.config), overwrite=args.overwrite)
    with (
        RoundProgress(cfg.federation.rounds) as progress,
        TensorBoardLog(run, enabled=args.tensorboard) as tb,
    ):

        def on_round(row: dict[str, Any]) -> None:
            progress.update(row)
            tb.add(row)

        simulate(cfg, run, on_round, resume=bool(args.resume))
    print(f"run directory: {run.path}")
    final = run.read_jsonl()[-1]
    print(_final_line(final))
    return 0


def _resumed(args: argparse.Namespace) -> tuple[Config, Any]:
    """The run's own config (only ``federation.rounds`` may change) and its directory, checkpoint present."""
    from fedlayer.checkpoint import load_checkpoint
    from fedlayer.results import RunDir

    if args.out or args.overwrite:
        raise ConfigError("--resume: continues RUN_DIR in place; drop --out / --overwrite")
    for item in args.overrides:
        if item.partition("=")[0].strip() != "federation.rounds":
            raise ConfigError(f"--set {item!r}: with --resume only federation.rounds may change")
    run = RunDir(Path(args.resume))
    resolved = run.file("config.resolved.toml")
    if not resolved.exists():
        raise ConfigError(f"--resume: {args.resume!r} is not a run directory (no config.resolved.toml)")
    cfg = load_config(resolved, args.overrides)
    done = load_checkpoint(run).round
    if done >= cfg.federation.rounds:
        raise ConfigError(
            f"--resume: {args.resume!r} already completed {done} of federation.rounds="
            f"{cfg.federation.rounds}; pass --set federation.rounds=N with N > {done}"
        )
    return cfg, run


def _check_before_start(cfg: Config) -> None:
    """Fail fast on what would otherwise fail inside the simulation (data, partitions, selectors)."""
    from fedlayer.experiment import federated_data, initial_model
    from fedlayer.server_app import shared_layers
    from fedlayer.simulation import available_gpus
    from strategies import AGGREGATORS, aggregator_name

    check_gpus(cfg, available_gpus())

    aggregator = aggregator_name(cfg.strategy)
    if aggregator not in AGGREGATORS:
        raise ConfigError(
            f"strategy.aggregator: {aggregator!r} is not allowed; choose one of: {', '.join(AGGREGATORS)}"
        )
    data = federated_data(cfg)
    shared_layers(cfg, initial_model(cfg, data.test))


def _final_line(row: dict[str, Any]) -> str:
    keys = ("global_acc", "personalized_acc", "personalized_acc_worst10", "train_loss")
    return (
        "final round " + str(row["round"]) + ": " + ", ".join(f"{k} {row[k]:.4f}" for k in keys if k in row)
    )


def cmd_partitions(args: argparse.Namespace) -> int:
    from fedlayer.experiment import federated_data
    from fedlayer.results import RunDir

    cfg = load_config(args.config, args.overrides)
    data = federated_data(cfg)
    run = RunDir.create(args.out, overwrite=True)
    data.write_partition_report(run.path, cfg.data.partitioner)
    for split in data.splits:
        print(f"client {split.partition_id}: {len(split.train_idx)} train / {len(split.test_idx)} test")
    print(f"written: {run.file('partition.json')}, {run.file('partition.png')}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "partitions": cmd_partitions,
    "compare": cmd_compare,
    "report": cmd_report,
    "deploy": cmd_deploy,
}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage statistics from Flower / flwr-datasets
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except RuntimeError as err:
        failed = _round_failure(err)
        if failed is None:
            raise
        print(f"fedlayer: error: {failed}", file=sys.stderr)
        return 1
    except (ConfigError, ValueError) as err:
        if not _is_input_error(err):
            raise
        print(f"fedlayer: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _round_failure(err: BaseException | None) -> BaseException | None:
    """The RoundFailedError behind Flower's wrapping, if that is what ended the run."""
    from strategies.mechanism import RoundFailedError

    while err is not None and not isinstance(err, RoundFailedError):
        err = err.__cause__ or err.__context__
    return err


def _is_input_error(err: Exception) -> bool:
    from fedlayer.data import DataError
    from fedlayer.layers import SelectorError

    return isinstance(err, ConfigError | DataError | SelectorError)


if __name__ == "__main__":
    sys.exit(main())
