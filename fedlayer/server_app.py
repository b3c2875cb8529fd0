"""Flower ServerApp: builds the partial-aggregation strategy from the config, runs rounds, writes results."""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlayer.config import Config, load_config, to_toml
from fedlayer.data import write_partition_report
from fedlayer.experiment import FederatedData, federated_data, initial_model
from fedlayer.layers import Resolution, resolve
from fedlayer.results import RoundCallback, RoundRecorder, RunDir, plot_accuracy, save_arrays
from fedlayer.training import evaluate, resolve_device
from strategies import PartialStrategy, aggregator_name, get_algorithm, make_aggregator

app = ServerApp()


def shared_layers(cfg: Config, model: object) -> Resolution:
    """Resolve the algorithm's selector against the model (config errors name strategy.shared)."""
    algorithm = get_algorithm(cfg.strategy)
    return resolve(algorithm.selector(cfg.strategy), model, field="strategy.shared")  # type: ignore[arg-type]


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


def run_server(grid: Grid, cfg: Config, run: RunDir, on_round: RoundCallback | None = None) -> None:
    """Run the federation described by ``cfg`` on ``grid`` and write everything into ``run``."""
    started = time.perf_counter()
    run.write_text("config.resolved.toml", to_toml(cfg))
    data = federated_data(cfg)
    write_partition_report(
        run.path, data.splits, data.train.y.numpy(), data.train.num_classes, partitioner=cfg.data.partitioner
    )
    model = initial_model(cfg, data.test)
    layers = shared_layers(cfg, model)
    run.write_json("layers.json", layers.to_json())
    log(INFO, "fedlayer: %s", layers.describe())
    recorder = RoundRecorder(run, on_round)
    base = make_aggregator(aggregator_name(cfg.strategy), cfg.strategy, cfg.federation)
    strategy = PartialStrategy(base, layers.shared_keys, observers=[recorder])
    experiment = ConfigRecord({"experiment": to_toml(cfg)})
    initial = ArrayRecord(model.state_dict())
    save_arrays(run, "initial_model.pt", initial)
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.federation.rounds,
        train_config=experiment,
        evaluate_config=ConfigRecord(dict(experiment)),
        evaluate_fn=global_evaluator(cfg, data, recorder),
    )
    save_arrays(run, "model.pt", result.arrays)
    plot_accuracy(run)
    run.write_json(
        "summary.json",
        {"status": "finished", "seconds": time.perf_counter() - started, "rounds": cfg.federation.rounds},
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: the experiment file and overrides come from the run config."""
    rc = context.run_config
    overrides = [item for item in str(rc.get("overrides", "")).split(";") if item.strip()]
    cfg = load_config(str(rc.get("config", "experiments/default.toml")), overrides)
    out = str(rc.get("out", "")) or f"runs/flwr-{time.strftime('%Y%m%d-%H%M%S')}"
    run_server(grid, cfg, RunDir.create(Path(out)))
