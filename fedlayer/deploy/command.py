"""``fedlayer deploy local``: the experiment on Flower's Deployment Engine, all processes on 127.0.0.1.

One ``flower-superlink`` and N ``flower-supernode`` processes (each with ``partition-id=i
num-partitions=N`` in its node config), the run submitted with ``flwr run`` against an isolated
``FLWR_HOME`` (see :mod:`fedlayer.deploy.local` and :mod:`fedlayer.deploy.flwr_cli`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fedlayer.config import Config, ConfigError, load_config
from fedlayer.deploy.flwr_cli import DeployError, RunOutcome, tail
from fedlayer.deploy.local import HOST, LocalDeployment, TlsFiles, check_options, default_app_dir
from fedlayer.inputs import add_config, add_out, check_before_start, check_out, load, positive_int
from fedlayer.processes import exit_code, raise_signalled
from fedlayer.run.files import CONFIG_RESOLVED, DEPLOY, FLOWER_LOG, METRICS


def deployment_overrides(cfg: Config, supernodes: int) -> list[str]:
    """Overrides that make the config fit ``supernodes`` SuperNodes (``federation.clients`` = N)."""
    extra = []
    if cfg.federation.clients != supernodes:
        extra.append(f"federation.clients={supernodes}")
    if cfg.analysis.max_clients > supernodes:
        extra.append(f"analysis.max_clients={supernodes}")
    return extra


def run_config(config: Path, overrides: Sequence[str], out: Path) -> dict[str, str]:
    """The app's run config (pyproject ``[tool.flwr.app.config]``): config file, overrides, run dir."""
    bad = [item for item in overrides if ";" in item]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: ';' separates overrides in the run config; drop it")
    return {"config": str(config.resolve()), "overrides": ";".join(overrides), "out": str(out.resolve())}


def prepare_out(out: Path, overwrite: bool) -> Path:
    """An empty run directory (the ServerApp refuses a non-empty one); --overwrite clears an old run."""
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out: run directory {str(out)!r} exists and is not empty; pass --overwrite")
        if not any((out / name).exists() for name in (CONFIG_RESOLVED, METRICS)):
            raise ConfigError(f"--out: {str(out)!r} is not a fedlayer run directory; not clearing it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def add_deploy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``deploy local CONFIG --supernodes N ...`` to the ``fedlayer`` subcommands."""
    deploy = subparsers.add_parser("deploy", help="run the experiment on Flower's Deployment Engine")
    targets = deploy.add_subparsers(dest="target", required=True)
    local = targets.add_parser(
        "local", help="a real SuperLink and N SuperNodes as processes on 127.0.0.1; `flwr run` submits"
    )
    add_config(local)
    local.add_argument("--supernodes", type=positive_int, default=2, help="SuperNodes = federation.clients")
    add_out(local, "run directory (default: runs/<config>-deploy-<timestamp>)")
    local.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    local.add_argument("--tls", metavar="CERTDIR", help="serve over TLS with docker/certs.sh certificates")
    local.add_argument("--auth", action="store_true", help="accept registered SuperNodes only (needs --tls)")
    local.add_argument(
        "--node-data",
        metavar="DIR",
        help="SuperNode i trains on its own data in DIR/partition-<i> (fedlayer partitions --export DIR)",
    )
    local.add_argument("--app", help="Flower app directory (default: this fedlayer checkout)")
    local.add_argument("--timeout", type=float, default=0.0, help="seconds before giving up (0 = none)")
    local.add_argument("--keep-workdir", metavar="DIR", help="keep FLWR_HOME and process logs in DIR")
    local.add_argument("--verbose", action="store_true", help="print the ServerApp log as it streams")
    return deploy


def cmd_deploy(args: argparse.Namespace) -> int:
    """``fedlayer deploy local``: 0 when the run completed, 1 when it failed or the deployment broke."""
    cfg = load(args)
    forced = deployment_overrides(cfg, args.supernodes)
    if forced:
        print(f"deploy: {args.supernodes} SuperNodes, so setting {', '.join(forced)}")
    overrides = [*args.overrides, *forced]
    cfg = load_config(args.config, overrides)
    check_before_start(cfg)
    tls = TlsFiles.from_dir(args.tls) if args.tls else None
    check_options(args.supernodes, tls, args.auth)
    node_data = Path(args.node_data).resolve() if args.node_data else None
    if node_data is not None:
        _check_node_data(node_data, args.supernodes, cfg)
    app_dir = Path(args.app).resolve() if args.app else default_app_dir()
    out = prepare_out(check_out(args.out or _default_out(args.config)), args.overwrite)
    workdir = Path(args.keep_workdir).resolve() if args.keep_workdir else None
    with _stop_on_signals():
        try:
            deployment = LocalDeployment(
                args.supernodes, app_dir, tls, workdir, node_data=node_data, auth=args.auth
            )
            outcome = _deploy_and_run(args, cfg, deployment, run_config(Path(args.config), overrides, out))
        except DeployError as err:
            print(f"fedlayer deploy: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as stop:
            print("fedlayer deploy: interrupted; the deployment was shut down", file=sys.stderr)
            return exit_code(stop)
    return report(outcome, out)


def _deploy_and_run(
    args: argparse.Namespace, cfg: Config, deployment: LocalDeployment, rc: dict[str, str]
) -> RunOutcome:
    from fedlayer.run.progress import RoundProgress

    out = Path(rc["out"])
    mode = ("TLS, SuperNode authentication" if deployment.auth else "TLS") if deployment.tls else "insecure"
    data = f"; own data in {deployment.node_data}/partition-<i>" if deployment.node_data else ""
    print(f"deploy: starting a SuperLink ({mode}) and {args.supernodes} SuperNodes on {HOST}{data}")
    with deployment:
        run_id = deployment.submit(rc)
        print(f"deploy: run {run_id} submitted; run directory {out}")
        try:
            with RoundProgress(cfg.federation.rounds) as progress:
                tick = _progress_from_metrics(out, progress.update)
                echo = sys.stdout if args.verbose else None
                outcome = deployment.wait(run_id, timeout=args.timeout, on_tick=tick, echo=echo)
        except BaseException:
            deployment.stop_run(run_id)
            deployment.collect(out)
            raise
        deployment.collect(out)
    return outcome


def report(outcome: RunOutcome, out: Path) -> int:
    """Write ``deploy.json``, print the outcome; the exit code (1 unless the run completed)."""
    from fedlayer.run.progress import fault_summary
    from fedlayer.run.rundir import RunDir

    run = RunDir(out)
    summary = {"run_id": outcome.run_id, "status": outcome.status, "details": outcome.details}
    run.write_json(DEPLOY, summary | {"seconds": outcome.seconds})
    print(f"run directory: {out}")
    if not outcome.ok:
        print(f"deploy: run {outcome.run_id} {outcome.status}: {outcome.details}", file=sys.stderr)
        print(_failure(out / FLOWER_LOG) or tail(out / FLOWER_LOG), file=sys.stderr)
        return 1
    rows = run.read_jsonl()
    if rows:
        last = rows[-1]
        keys = [k for k in ("global_acc", "personalized_acc", "train_loss") if k in last]
        print(f"final round {last['round']}: " + ", ".join(f"{k} {last[k]:.4f}" for k in keys))
    if faults := fault_summary(rows):
        logging.getLogger(__name__).warning(faults)
    return 0


def _failure(server_log: Path) -> str:
    """The ServerApp's one-line failure in its log (too few valid client updates, a full disk), without
    the traceback Flower logs around it; "" when it failed otherwise."""
    from fedlayer.run.atomic import NoSpaceLeft
    from strategies.mechanism import RoundFailedError

    names = "|".join(error.__name__ for error in (RoundFailedError, NoSpaceLeft))
    text = server_log.read_text(errors="replace") if server_log.exists() else ""
    found = re.findall(rf"\b(?:{names}): (.*)", text)
    return f"fedlayer deploy: error: {found[-1].strip()}" if found else ""


def _progress_from_metrics(out: Path, update: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
    """A tick that feeds new metrics.jsonl rows (written by the ServerApp) to the progress bar."""
    seen = [0]

    def tick() -> None:
        path = out / METRICS
        if not path.exists():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        for line in lines[seen[0] :]:
            with contextlib.suppress(json.JSONDecodeError):
                update(json.loads(line))
                seen[0] += 1

    return tick


def _check_node_data(root: Path, supernodes: int, cfg: Config) -> None:
    """Each SuperNode's data folder exists and holds only the experiment's classes (one-line DataError)."""
    from fedlayer.data.folder import check_folder

    for i in range(supernodes):
        check_folder(root / f"partition-{i}", cfg.data.dataset, field="--node-data")


def _default_out(config_path: str) -> Path:
    return Path("runs") / f"{Path(config_path).stem}-deploy-{time.strftime('%Y%m%d-%H%M%S')}"


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM (e.g. from a CI runner) shut the deployment down.

    SIGINT is handled even when this process inherited it ignored (a job started with ``&`` by a shell
    without job control), as ``fedlayer run`` and ``fedlayer compare`` do: otherwise such a deployment runs
    on after its caller's SIGINT, and its SuperLink and SuperNodes with it.
    """

    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {sig: signal.signal(sig, raise_signalled) for sig in signals}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
