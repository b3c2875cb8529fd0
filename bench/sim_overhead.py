"""Simulation overhead: the same local work through fedlayer's Flower simulation vs a plain torch loop.

Both sides use the same partitions, initial model, seeds, recipe and evaluations per round:
each client evaluates (before, where ``train.evaluate_before``), trains, evaluates (after, where
``train.evaluate_after``); the server averages; every client evaluates the new model; the server evaluates
the global model unless the clients' evaluations were that already (pooled data, FedAvg:
``fedlayer.server.app.global_is_pooled_personalized``). Prints start-up seconds and the steady-state
round-time ratio (simulation / plain), median over rounds >= 2.

    .venv/bin/python bench/sim_overhead.py [--config TOML] [--rounds 4] [--clients 10] [--max-samples 12000]
                                           [--set key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedlayer.config import Config, load_config
from fedlayer.experiment import client_generator, federated_data, initial_model
from fedlayer.run.rundir import RunDir
from fedlayer.server.app import global_is_pooled_personalized, shared_layers
from fedlayer.simulation import simulate
from fedlayer.training import evaluate, train_epochs

ROOT = Path(__file__).resolve().parents[1]


def plain_round(cfg: Config, global_model: torch.nn.Module, server_round: int) -> torch.nn.Module:
    """One FedAvg round over all clients in this process, same work as a simulated round."""
    data = federated_data(cfg)
    device = torch.device("cpu")
    states, weights = [], []
    for split in data.splits:
        train, test = data.client(split.partition_id)
        model = copy.deepcopy(global_model)
        if cfg.train.evaluate_before:
            evaluate(model, test.x, test.y, device=device)
        train_epochs(
            model,
            train.x,
            train.y,
            cfg.train,
            epochs=cfg.train.epochs,
            device=device,
            generator=client_generator(cfg, split.partition_id, server_round),
        )
        if cfg.train.evaluate_after:
            evaluate(model, test.x, test.y, device=device)
        states.append(model.state_dict())
        weights.append(len(train))
    total = sum(weights)
    averaged = {
        k: sum(s[k].float() * (w / total) for s, w in zip(states, weights, strict=True)).to(v.dtype)
        for k, v in global_model.state_dict().items()
    }
    global_model.load_state_dict(averaged)
    for split in data.splits:
        _, test = data.client(split.partition_id)
        evaluate(global_model, test.x, test.y, device=device)
    if not global_is_pooled_personalized(cfg, shared_layers(cfg, global_model)):
        evaluate(global_model, data.test.x, data.test.y, device=device)
    return global_model


def run_plain(cfg: Config) -> tuple[float, list[float]]:
    started = time.perf_counter()
    data = federated_data(cfg)
    model = initial_model(cfg, data.test)
    startup = time.perf_counter() - started
    times = []
    for server_round in range(1, cfg.federation.rounds + 1):
        t0 = time.perf_counter()
        model = plain_round(cfg, model, server_round)
        times.append(time.perf_counter() - t0)
    return startup, times


def run_simulation(cfg: Config) -> tuple[float, list[float]]:
    out = RunDir.create(Path(tempfile.mkdtemp(prefix="fedlayer-bench-")) / "run")
    started = time.perf_counter()
    first_round: list[float] = []

    def on_round(row: dict[str, float]) -> None:
        if row["round"] == 1:
            first_round.append(time.perf_counter() - started - row["round_seconds"])

    simulate(cfg, out, on_round)
    rows = out.read_jsonl()
    return first_round[0], [r["round_seconds"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(ROOT / "experiments" / "default.toml"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--max-samples", type=int, default=12000)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config key=value")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    cfg = load_config(
        args.config,
        [
            f"federation.rounds={args.rounds}",
            f"federation.clients={args.clients}",
            f"data.max_samples={args.max_samples}",
            "train.device='cpu'",
            *args.overrides,
        ],
    )
    sim_startup, sim_rounds = run_simulation(cfg)
    plain_startup, plain_rounds = run_plain(cfg)
    sim_steady, plain_steady = statistics.median(sim_rounds[1:]), statistics.median(plain_rounds[1:])
    result = {
        "clients": args.clients,
        "rounds": args.rounds,
        "max_samples": args.max_samples,
        "overrides": args.overrides,
        "startup_s": {"simulation": round(sim_startup, 2), "plain": round(plain_startup, 2)},
        "round_s": {
            "simulation": [round(t, 3) for t in sim_rounds],
            "plain": [round(t, 3) for t in plain_rounds],
        },
        "steady_round_ratio": round(sim_steady / plain_steady, 3),
        "torch_threads_plain": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
