"""Flower ServerApp: builds the partial-aggregation strategy from the config, runs rounds, writes results."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from fedlayer.analysis.hook import GLOBAL, AnalysisHook, is_analysis_round
from fedlayer.analysis.plots import LAYERS_BY_ROUND, plot_shared_blocks
from fedlayer.checkpoint import CLIENT_STATE, checkpointing, load_checkpoint, restore
from fedlayer.config import NORMS, Config, ConfigError, check_gpus, load_config, to_toml
from fedlayer.experiment import FederatedData, federated_data, initial_model
from fedlayer.layers import Resolution, Selector, SelectorError, resolve
from fedlayer.models import model_groups
from fedlayer.nodes import PartitionCheck, excluded_partitions, node_partitions
from fedlayer.report import plot_accuracy
from fedlayer.results import RoundCallback, RoundRecorder, RunDir, save_arrays
from fedlayer.training import evaluate, resolve_device
from strategies import PartialStrategy, RoundObserver, aggregator_name, get_algorithm, make_aggregator
from strategies.sharing import LmcPolicy, LmcRule, SharingPolicy

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
    """The barrier-guided policy of a dynamic algorithm (``lmc``); ``None`` for a fixed shared set."""
    s = cfg.strategy
    if not get_algorithm(s).dynamic:
        return None
    never = _blocks(s.exclude, model, "strategy.exclude")
    always = _blocks(s.lmc_always, model, "strategy.lmc_always")
    if both := sorted(never & always):
        raise ConfigError(f"strategy.lmc_always: {', '.join(both)} also excluded by strategy.exclude")
    rule = LmcRule(s.lmc_threshold, s.lmc_share_fraction, s.lmc_statistic, s.lmc_quantile)
    return LmcPolicy(
        layers.blocks,
        layers.shared_blocks,
        rule=rule,
        every=s.lmc_every,
        source=s.lmc_source,
        always=always,
        never=never,
        reshare=s.lmc_reshare,
        norm=set(model_groups(model)["norm"]),
    )


def _blocks(patterns: list[str], model: torch.nn.Module, field: str) -> set[str]:
    if not patterns:
        return set()
    return set(resolve(Selector(include=patterns), model, field=field).shared_blocks)


class SharingLog(RoundObserver):
    """``layers_by_round.json``: per round the shared blocks and, in decision rounds, the measured costs."""

    def __init__(self, run: RunDir, policy: LmcPolicy) -> None:
        self.run, self.policy = run, policy

    def on_aggregated(self, server_round: int, previous: ArrayRecord, aggregated: ArrayRecord) -> None:
        rounds = {
            r: {"shared": shared, "costs": self.policy.costs.get(r, {})}
            for r, shared in sorted(self.policy.history.items())
        }
        self.run.write_json(LAYERS_BY_ROUND, {"blocks": list(self.policy.blocks), "rounds": rounds})


class ServerCosts(RoundObserver):
    """``lmc_source = "server"``: a decision from the analysis hook's layer barriers of the round (it waits
    for the actor), as the mean over pairs and both bases of the midpoint barrier B_l."""

    def __init__(self, hook: AnalysisHook, policy: LmcPolicy) -> None:
        self.hook, self.policy = hook, policy

    def on_aggregated(self, server_round: int, previous: ArrayRecord, aggregated: ArrayRecord) -> None:
        if not self.policy.measures(server_round):
            return
        rows = [
            r
            for r in self.hook.rows_of(server_round)
            if r["kind"] == "layer"
            and float(r["alpha"]) == 0.5
            and GLOBAL not in (r["client_a"], r["client_b"])
        ]
        by_block: dict[str, list[float]] = {}
        for row in rows:
            by_block.setdefault(row["block"], []).append(float(row["barrier"]))
        costs = {block: sum(values) / len(values) for block, values in by_block.items()}
        self.policy.decide(server_round, [costs] if costs else [], [1.0] if costs else [])


def global_evaluator(
    cfg: Config, data: FederatedData, recorder: RoundRecorder
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Centralized evaluation of the global model on the server's test set, after every round."""
    device = resolve_device(cfg.train.device)
    model = initial_model(cfg, data.test).to(device)
    x, y = data.test.x, data.test.y

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, x, y, device=device)
        recorder.finish_round(server_round, loss, acc)
        return MetricRecord({"global_loss": loss, "global_acc": acc})

    return evaluate_fn


class HeapTrim(RoundObserver):
    """Hands the memory freed during a round back to the OS (glibc's ``malloc_trim``; elsewhere a no-op).

    The engine (de)serializes every message in its own threads; glibc keeps what they free in per-thread
    arenas, and the server's RSS crept up ~0.1 MiB per round without this (bench/memory.py).
    """

    def __init__(self) -> None:
        libc = ctypes.util.find_library("c")
        self._trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None

    def on_evaluate_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        if self._trim is not None:
            self._trim(0)


class AnalysisObserver(RoundObserver):
    """Hands the full client models of analysis rounds (and the new global model) to the analysis hook."""

    def __init__(self, cfg: Config, hook: AnalysisHook) -> None:
        self.cfg, self.hook = cfg, hook
        self.models: dict[int | str, dict] = {}

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        if not is_analysis_round(self.cfg.analysis, server_round):
            return
        for reply in replies:
            if reply.has_content():
                pid = int(reply.content.metric_records["metrics"]["partition-id"])  # type: ignore[arg-type]
                self.models[pid] = reply.content.array_records["arrays"].to_torch_state_dict()

    def on_aggregated(self, server_round: int, previous: ArrayRecord, aggregated: ArrayRecord) -> None:
        if not self.models:
            self.hook.poll()
            return
        models, self.models = self.models, {}
        if self.cfg.analysis.pairs in ("global", "both"):
            models[GLOBAL] = aggregated.to_torch_state_dict()
        self.hook.submit(server_round, models, previous.to_torch_state_dict())


class Interruption(RoundObserver):
    """Calls ``interrupt`` as soon as a round's replies are in, before they count: the replies of clients
    stopped by an interruption must be neither faults nor results."""

    def __init__(self, interrupt: Callable[[], None]) -> None:
        self.interrupt = interrupt

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        self.interrupt()

    def on_evaluate_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        self.interrupt()


class InterruptibleGrid(Grid):
    """Flower's grid, except that ``interrupt`` is called while it waits for replies and may raise to end
    the wait (Flower's own wait ends only when every reply is in)."""

    poll_seconds = 0.1

    def __init__(self, grid: Grid, interrupt: Callable[[], None]) -> None:
        self.grid, self.interrupt = grid, interrupt

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Any:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            self.interrupt()
            got = list(self.pull_messages(waiting))
            replies += got
            waiting -= {reply.metadata.reply_to_message_id for reply in got}
            if waiting:
                time.sleep(self.poll_seconds)
        self.interrupt()
        return replies


def analysis_hook(cfg: Config, run: RunDir) -> AnalysisHook | None:
    """The per-round barrier analysis, when ``analysis.every`` > 0."""
    if cfg.analysis.every == 0:
        return None
    import torch

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
    run.write_text("config.resolved.toml", to_toml(cfg))
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
    model = initial_model(cfg, data.test)
    layers = shared_layers(cfg, model)
    run.write_json("layers.json", layers.to_json())
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
            observers.append(ServerCosts(hook, sharing))
        observers.append(SharingLog(run, sharing))
    base = make_aggregator(aggregator_name(cfg.strategy), cfg.strategy, cfg.federation)
    strategy = PartialStrategy(
        base,
        layers.shared_keys,
        full_model_rounds=lambda r: is_analysis_round(cfg.analysis, r),
        observers=observers,
        sampling_seed=cfg.seed,
        sharing=sharing,
    )
    experiment = ConfigRecord({"experiment": to_toml(cfg)})
    if client_state:
        experiment["state-dir"] = str(run.file(CLIENT_STATE).resolve())
    initial = ArrayRecord(model.state_dict())
    if resume:
        checkpoint = load_checkpoint(run)
        restore(run, checkpoint, strategy)
        initial = checkpoint.arrays
        log(INFO, "fedlayer: resuming %s after round %d", run.path, checkpoint.round)
    else:
        save_arrays(run, "initial_model.pt", initial)
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
            evaluate_fn=checkpointing(global_evaluator(cfg, data, recorder), run, strategy),
        )
    except BaseException:
        if hook is not None:
            hook.abort()  # the run ends here: its pending analyses would only delay the exit
        raise
    save_arrays(run, "model.pt", result.arrays)
    if hook is not None:
        hook.finish(interrupt)
    plot_accuracy(run.path)
    if isinstance(sharing, LmcPolicy):
        plot_shared_blocks(run.path)
    run.write_json(
        "summary.json",
        {"status": "finished", "seconds": time.perf_counter() - started, "rounds": cfg.federation.rounds},
    )


def app_path(config: str) -> Path:
    """A relative config path that is not under the working directory is taken from the app directory."""
    path = Path(config)
    if path.is_absolute() or path.exists():
        return path
    return Path(__file__).resolve().parents[1] / path


def log_flower_to(run: RunDir) -> None:
    """Flower's INFO log (and fedlayer's, which uses Flower's logger) also goes to ``RUN_DIR/flower.log``."""
    logger = logging.getLogger("flwr")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)  # a previous run's file, in this process
            handler.close()
    file_handler = logging.FileHandler(run.file("flower.log"))
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(file_handler)
    logger.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the experiment file and overrides come from the run config.

    Under ``flwr run``'s Simulation Runtime (an in-memory grid) the clients share this machine's file
    system, so they keep their personal layers in the run directory as ``fedlayer run`` does; on the
    Deployment Engine personal layers stay on the SuperNodes.
    """
    rc = context.run_config
    overrides = [item for item in str(rc.get("overrides", "")).split(";") if item.strip()]
    cfg = load_config(app_path(str(rc.get("config", "experiments/default.toml"))), overrides)
    out = str(rc.get("out", "")) or f"runs/flwr-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunDir.create(Path(out))
    log_flower_to(run)
    # `flwr run` of a simulation: the clients share this file system, so their layers go into the run.
    run_server(grid, cfg, run, client_state=isinstance(grid, InMemoryGrid))
