"""The server side's Flower adapter: builds the partial-aggregation strategy from the config, runs the rounds,
writes the run directory.

The aggregation itself is :mod:`strategies` (mechanism, aggregators, the algorithm registry, sharing
policies); this module wires it to the run: observers (:mod:`fedlayer.server.observers`), the analysis hook
(:mod:`fedlayer.server.hook`), checkpoints (:mod:`fedlayer.server.checkpoint`) and the node -> partition
mapping (:mod:`fedlayer.server.nodes`).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlayer import flower
from fedlayer.config import DEFAULT_EXPERIMENT, NORMS, Config, ConfigError, check_gpus, load_config, to_toml
from fedlayer.contract import EXPERIMENT, STATE_DIR
from fedlayer.experiment import FederatedData, federated_data, initial_model
from fedlayer.layers import Resolution, Selector, SelectorError, resolve
from fedlayer.models import global_view
from fedlayer.run import files
from fedlayer.run.plots import plot_shared_blocks
from fedlayer.run.report import plot_accuracy
from fedlayer.run.rundir import RunDir, save_arrays
from fedlayer.server.checkpoint import checkpointing, load_checkpoint, restore
from fedlayer.server.grid import InterruptibleGrid
from fedlayer.server.hook import AnalysisHook, is_analysis_round
from fedlayer.server.nodes import PartitionCheck, excluded_partitions, node_partitions
from fedlayer.server.observers import (
    AnalysisObserver,
    HeapTrim,
    Interruption,
    RoundCallback,
    RoundRecorder,
)
from fedlayer.training import evaluate, resolve_device
from strategies import PartialStrategy, RoundObserver, aggregator_name, get_algorithm, make_aggregator
from strategies.fedcac import CriticalCollaboration
from strategies.lmc import LmcPolicy, ServerCosts, SharingLog, lmc_policy
from strategies.sharing import SharingPolicy

app = ServerApp()


def shared_layers(cfg: Config, model: object) -> Resolution:
    """Resolve the algorithm's selector against the model (config errors name strategy.shared)."""
    algorithm = get_algorithm(cfg.strategy)
    try:  # the algorithm's own personal blocks (FedBN's norm layers): if absent, the model lacks them
        resolve(Selector(include=list(algorithm.exclude)), model)  # type: ignore[arg-type]
    except SelectorError:
        raise ConfigError(
            f"model.norm: {cfg.model.norm!r} is not allowed with strategy.name = {algorithm.name!r}, which "
            f"keeps {', '.join(algorithm.exclude)} personal: {cfg.model.name} has no such block; "
            f"choose one of: {', '.join(n for n in NORMS if n != 'none')}"
        ) from None
    return resolve(algorithm.selector(cfg.strategy), model, field="strategy.shared")  # type: ignore[arg-type]


def sharing_policy(cfg: Config, model: torch.nn.Module, layers: Resolution) -> SharingPolicy | None:
    """The policy of a dynamic algorithm (``lmc``: :mod:`strategies.lmc`); ``None`` for a fixed shared set."""
    if not get_algorithm(cfg.strategy).dynamic:
        return None
    return lmc_policy(cfg.strategy, model, layers)


def global_is_pooled_personalized(cfg: Config, layers: Resolution) -> bool:
    """Whether the server's global evaluation repeats the clients' evaluate phase: every client evaluates
    the global model itself (all of it shared, no extension, evaluated as it is, the same model for all)
    on its local test split, and the server's test set is the union of those splits (pooled data, not
    sub-sampled, labels as the clients see them). Then the pooled client results are the global ones."""
    algorithm = get_algorithm(cfg.strategy)
    return (
        not layers.personal_keys
        and algorithm.personalization == "as_is"
        and algorithm.extension is None
        and not algorithm.per_client
        and not algorithm.dynamic
        and cfg.data.pool == "train+test"
        and cfg.data.max_test_samples == 0
        and cfg.data.label_shift == "none"
    )


class GlobalEvaluator:
    """Centralized evaluation of the global model on the server's test set, after every evaluated round
    (``federation.evaluate_every``; round 0, the initial model, too).

    With ``from_clients`` (:func:`global_is_pooled_personalized`), a round whose evaluate phase covered the
    whole test set takes the pooled client results instead of evaluating again (``derived`` counts them).
    """

    def __init__(self, cfg: Config, data: FederatedData, recorder: RoundRecorder, from_clients: bool) -> None:
        self.cfg, self.recorder, self.from_clients = cfg, recorder, from_clients
        self.device = resolve_device(cfg.train.device)
        extension = get_algorithm(cfg.strategy).extension
        self.model = global_view(initial_model(cfg, data.test, extension)).to(self.device)
        self.x, self.y = data.test.x, data.test.y
        self.derived = 0

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0 and not self.cfg.federation.evaluates(server_round):
            self.recorder.finish_round(server_round)
            return None
        loss, acc = self._pooled() or self._evaluate(arrays)
        self.recorder.finish_round(server_round, loss, acc)
        return MetricRecord({"global_loss": loss, "global_acc": acc})

    def _pooled(self) -> tuple[float, float] | None:
        pooled = self.recorder.pooled
        if not self.from_clients or pooled is None or pooled.samples != len(self.y):
            return None
        self.derived += 1
        return pooled.loss, pooled.acc

    def _evaluate(self, arrays: ArrayRecord) -> tuple[float, float]:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(self.model, self.x, self.y, device=self.device)


def analysis_hook(cfg: Config, run: RunDir) -> AnalysisHook | None:
    """The per-round barrier analysis, when ``analysis.every`` > 0."""
    if cfg.analysis.every == 0:
        return None
    check_gpus(cfg, torch.cuda.device_count(), os.cpu_count() or 1)
    if cfg.analysis.max_clients == 0:
        clients = min(cfg.analysis.pair_clients, cfg.federation.clients)
        log(INFO, "fedlayer: analysis.max_clients = 0: pairs among up to %d sampled clients", clients)
    return AnalysisHook(cfg, run.path)


def run_server(
    grid: Grid,
    cfg: Config,
    run: RunDir,
    on_round: RoundCallback | None = None,
    *,
    resume: bool = False,
    client_state: bool = False,
    interrupt: Callable[[], None] | None = None,
) -> None:
    """Run the federation described by ``cfg`` on ``grid`` and write everything into ``run``.

    ``resume`` continues from ``run``'s checkpoint; ``client_state`` (simulation only: clients share the
    server's file system) makes clients keep their personal layers in ``run``, so a resume has them.
    ``interrupt`` is called whenever the server waits (between replies, for the analysis at the end) and
    raises to end the run there, before anything of an unfinished round is recorded (simulation: Ctrl-C).
    """
    started = time.perf_counter()
    run.write_text(files.CONFIG_RESOLVED, to_toml(cfg))
    data = federated_data(cfg)
    data.write_partition_report(run.path, cfg.data.partitioner)
    excluded = excluded_partitions(cfg, data)
    if excluded:
        log(
            WARNING,
            "fedlayer: %d of %d clients hold fewer than 2 samples and are left out of training and "
            "evaluation: partition ids %s",
            len(excluded),
            len(data.splits),
            ", ".join(map(str, excluded[:20])) + (", ..." if len(excluded) > 20 else ""),
        )
    model = initial_model(cfg, data.test, get_algorithm(cfg.strategy).extension)
    layers = shared_layers(cfg, model)
    run.write_json(files.LAYERS, layers.to_json())
    log(INFO, "fedlayer: %s", layers.describe())
    recorder = RoundRecorder(run, on_round)
    hook = analysis_hook(cfg, run)
    observers: list[RoundObserver] = [] if interrupt is None else [Interruption(interrupt)]
    observers += [recorder, HeapTrim()]
    if hook is not None:
        observers.append(AnalysisObserver(cfg, hook))
    sharing = sharing_policy(cfg, model, layers)
    if isinstance(sharing, LmcPolicy):
        if sharing.source == "server" and hook is not None:
            observers.append(ServerCosts(hook.rows_of, sharing))
        observers.append(SharingLog(sharing, lambda record: run.write_json(files.LAYERS_BY_ROUND, record)))
    base = make_aggregator(aggregator_name(cfg.strategy), cfg.strategy, cfg.federation)
    per_client = get_algorithm(cfg.strategy).per_client
    strategy = PartialStrategy(
        base,
        layers.shared_keys,
        full_model_rounds=lambda r: is_analysis_round(cfg.analysis, r),
        evaluate_rounds=cfg.federation.evaluates,
        downlink=CriticalCollaboration(cfg.strategy.cac_beta) if per_client else None,
        observers=observers,
        sampling_seed=cfg.seed,
        sharing=sharing,
    )
    experiment = ConfigRecord({EXPERIMENT: to_toml(cfg)})
    if client_state:
        experiment[STATE_DIR] = str(run.file(files.CLIENT_STATE).resolve())
    initial = ArrayRecord(model.state_dict())
    global_eval = GlobalEvaluator(cfg, data, recorder, global_is_pooled_personalized(cfg, layers))
    if global_eval.from_clients:
        log(INFO, "fedlayer: global metrics = the clients' evaluate phase pooled (same model, same samples)")
    if resume:
        checkpoint = load_checkpoint(run)
        restore(run, checkpoint, strategy)
        initial = checkpoint.arrays
        log(INFO, "fedlayer: resuming %s after round %d", run.path, checkpoint.round)
    else:
        save_arrays(run, files.INITIAL_MODEL, initial)
    strategy.excluded = set(excluded)
    strategy.partitions = node_partitions(grid, cfg, bool(excluded))
    strategy.observers.append(PartitionCheck(strategy.partitions))
    try:
        result = strategy.start(
            grid=grid if interrupt is None else InterruptibleGrid(grid, interrupt),
            initial_arrays=initial,
            num_rounds=cfg.federation.rounds - strategy.round_offset,
            train_config=experiment,
            evaluate_config=ConfigRecord(dict(experiment)),
            evaluate_fn=checkpointing(global_eval, run, strategy),
        )
    except BaseException:
        if hook is not None:
            hook.abort()  # the run ends here: its pending analyses would only delay the exit
        raise
    save_arrays(run, files.FINAL_MODEL, result.arrays)
    if hook is not None:
        hook.finish(interrupt)
    plot_accuracy(run.path)
    if isinstance(sharing, LmcPolicy):
        plot_shared_blocks(run.path)
    run.write_json(
        files.SUMMARY,
        {
            "status": "finished",
            "seconds": time.perf_counter() - started,
            "rounds": cfg.federation.rounds,
            "global_from_clients": global_eval.derived,
        },
    )


def app_path(config: str) -> Path:
    """A relative config path that is not under the working directory is taken from the app directory."""
    path = Path(config)
    if path.is_absolute() or path.exists():
        return path
    return Path(__file__).resolve().parents[2] / path


class _RunLog(logging.FileHandler):
    """``flower.log``. A record it cannot write (a full disk) is dropped without logging's traceback on
    stderr: the run ends with its own one-line error for the file it could not write."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def log_flower_to(run: RunDir) -> None:
    """Flower's INFO log (and fedlayer's, which uses Flower's logger) also goes to ``RUN_DIR/flower.log``."""
    logger = logging.getLogger(flower.LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)  # a previous run's file, in this process
            handler.close()
    file_handler = _RunLog(run.file(files.FLOWER_LOG))
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(file_handler)
    logger.setLevel(logging.INFO)


# Whitespace before the next `section.key=` separates overrides too (the obvious way to write several).
_NEXT_OVERRIDE = re.compile(r"\s+(?=[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+\s*=)")


def run_config_overrides(text: str) -> list[str]:
    """The run config's ``overrides``: ``section.key=value`` items separated by ``;`` (or new lines, or
    whitespace before the next ``section.key=``)."""
    chunks = [chunk.strip() for chunk in re.split(r"[;\n]", text)]
    items = [item for chunk in chunks if chunk for item in _NEXT_OVERRIDE.split(chunk)]
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"overrides: {item!r} is not section.key=value; separate overrides with ';', "
                "e.g. overrides='federation.rounds=2;train.lr=0.01'"
            )
    return items


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the experiment file and overrides come from the run config.

    Under ``flwr run``'s Simulation Runtime (an in-memory grid) the clients share this machine's file
    system, so they keep their personal layers in the run directory as ``fedlayer run`` does; on the
    Deployment Engine personal layers stay on the SuperNodes.
    """
    flower.one_line_errors(ConfigError)
    rc = context.run_config
    overrides = run_config_overrides(str(rc.get("overrides", "")))
    cfg = load_config(app_path(str(rc.get("config", DEFAULT_EXPERIMENT))), overrides)
    out = str(rc.get("out", "")) or f"runs/flwr-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunDir.create(Path(out))
    log_flower_to(run)
    # `flwr run` of a simulation: the clients share this file system, so their layers go into the run.
    run_server(grid, cfg, run, client_state=flower.is_simulation(grid))
