"""Where one round of a setting spends its time: the client work of every client, in this process.

Runs the client side of one round for every client sequentially without Flower or Ray — local training,
the personalized evaluations (before training, after training, and the evaluate phase after aggregation),
the state-dict <-> ArrayRecord conversions of one reply — plus the server's aggregation and global
evaluation, each timed separately. Divide the client sums by the number of client actors running in
parallel and compare with the round time the simulation reports: the rest is Flower's and Ray's
(scheduling, message passing, actor calls).

    .venv/bin/python bench/profile_round.py experiments/pfllib_fmnist.toml [--set key=value ...] [--round 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedlayer.config import Config, load_config
from fedlayer.experiment import FederatedData, client_generator, federated_data, initial_model
from fedlayer.training import evaluate, resolve_device, train_epochs

ROOT = Path(__file__).resolve().parents[1]


class Stopwatch:
    """Sums the wall time of named steps: ``with watch("train"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - start


def client_round(cfg: Config, data: FederatedData, pid: int, server_round: int, watch: Stopwatch) -> dict:
    """One client's work in a round; returns its trained state as the server receives it."""
    device = resolve_device(cfg.train.device)
    train, test = data.client(pid)
    model = initial_model(cfg, data.test).to(device)
    if cfg.train.evaluate_before:
        with watch("eval_before"):
            evaluate(model, test.x, test.y, device=device)
    with watch("train"):
        generator = client_generator(cfg, pid, server_round)
        train_epochs(
            model, train.x, train.y, cfg.train, epochs=cfg.train.epochs, device=device, generator=generator
        )
    with watch("eval_after"):
        evaluate(model, test.x, test.y, device=device)
    with watch("to_arrayrecord"):
        record = ArrayRecord(model.state_dict())
    with watch("from_arrayrecord"):
        state = record.to_torch_state_dict()
    with watch("eval_phase"):
        evaluate(model, test.x, test.y, device=device)
    return state


def profile(cfg: Config, server_round: int) -> dict[str, float]:
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))  # as in a client actor
    data = federated_data(cfg)
    watch = Stopwatch()
    states = [client_round(cfg, data, pid, server_round, watch) for pid in range(cfg.federation.clients)]
    model = initial_model(cfg, data.test)
    with watch("server_aggregate"):
        model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    with watch("server_global_eval"):
        evaluate(model, data.test.x, data.test.y, device=torch.device("cpu"))
    return dict(watch.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", default=str(ROOT / "experiments" / "pfllib_fmnist.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--round", type=int, default=2)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    seconds = profile(cfg, args.round)
    client = sum(v for k, v in seconds.items() if not k.startswith("server"))
    print(
        json.dumps(
            {k: round(v, 2) for k, v in seconds.items()} | {"client_total": round(client, 2)}, indent=2
        )
    )


if __name__ == "__main__":
    main()
