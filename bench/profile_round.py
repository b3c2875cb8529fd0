"""Where one round of a setting spends its time: the client work of every client, in this process.

Runs the client side of one round for every client sequentially without Flower or Ray — local training,
the personalized evaluations (before and after training where ``train.evaluate_before`` / ``evaluate_after``
are on, and the evaluate phase after aggregation), the state-dict <-> ArrayRecord conversions of one reply —
plus the server's aggregation and global evaluation (left out where the server takes it from the clients'
evaluate phase), each timed separately. Divide the client sums by the number of client actors running in
parallel and compare with the round time the simulation reports: the rest is Flower's and Ray's
(scheduling, message passing, actor calls).

The analysis work is timed on the same models: with ``strategy.name = "lmc"`` each client's measurement of
its sharing costs (``lmc_costs``), and with ``--hook`` the analysis hook's work on the round's first
``analysis.max_clients`` clients (``hook``, as its Ray actor does it, one torch thread). Every step is timed
in CPU seconds of this single-threaded process as well as wall seconds, so the ratios hold on a loaded
machine: ``round_cpu`` is the CPU work of a round without the analysis, and ``lmc_ratio`` / ``hook_ratio``
are (round + that analysis) / round, the slowdown when the round's cores are busy (on a 2-core machine with
2 client actors they are).

    .venv/bin/python bench/profile_round.py experiments/pfllib_fmnist.toml [--set key=value ...] [--round 2]
                                            [--hook]
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

from fedlayer.analysis.sharing import cost_sample, sharing_costs
from fedlayer.config import Config, load_config
from fedlayer.experiment import FederatedData, client_generator, federated_data, initial_model
from fedlayer.models import model_blocks
from fedlayer.server.app import global_is_pooled_personalized, shared_layers
from fedlayer.server.hook import BarrierWorker
from fedlayer.training import evaluate, resolve_device, train_epochs

ROOT = Path(__file__).resolve().parents[1]


class Stopwatch:
    """Sums the wall and CPU time of named steps: ``with watch("train"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] += time.perf_counter() - start
        self.cpu[name] += time.process_time() - cpu


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
    if cfg.train.evaluate_after:
        with watch("eval_after"):
            evaluate(model, test.x, test.y, device=device)
    if cfg.strategy.name == "lmc":
        reference = initial_model(cfg, data.test).state_dict()  # any reference costs the same
        generator = torch.Generator().manual_seed(pid)
        with watch("lmc_costs"):
            sample = cost_sample(train.x, train.y, cfg.strategy.lmc_samples, generator)
            sharing_costs(model, reference, model_blocks(model), sample, device=device)
    with watch("to_arrayrecord"):
        record = ArrayRecord(model.state_dict())
    with watch("from_arrayrecord"):
        state = record.to_torch_state_dict()
    with watch("eval_phase"):
        evaluate(model, test.x, test.y, device=device)
    return state


def profile(cfg: Config, server_round: int, hook: bool) -> Stopwatch:
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))  # as in a client actor
    data = federated_data(cfg)
    watch = Stopwatch()
    states = [client_round(cfg, data, pid, server_round, watch) for pid in range(cfg.federation.clients)]
    model = initial_model(cfg, data.test)
    origin = model.state_dict()
    with watch("server_aggregate"):
        model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    if not global_is_pooled_personalized(cfg, shared_layers(cfg, model)):  # else pooled from the clients
        with watch("server_global_eval"):
            evaluate(model, data.test.x, data.test.y, device=torch.device("cpu"))
    if hook:
        worker = BarrierWorker(cfg)  # sets one torch thread, as in its actor
        with watch("hook"):
            worker.analyze(server_round, dict(enumerate(states[: cfg.analysis.pair_clients])), origin)
    return watch


ANALYSIS = ("lmc_costs", "hook")


def summary(watch: Stopwatch) -> dict[str, float]:
    """Wall seconds per step, the round's CPU seconds without the analysis, and each analysis' ratio."""
    client = sum(v for k, v in watch.seconds.items() if not k.startswith("server") and k not in ANALYSIS)
    round_cpu = sum(v for k, v in watch.cpu.items() if k not in ANALYSIS)
    ratios = {
        f"{k.split('_')[0]}_ratio": (round_cpu + watch.cpu[k]) / round_cpu for k in ANALYSIS if k in watch.cpu
    }
    return dict(watch.seconds) | {"client_total": client, "round_cpu": round_cpu} | ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", default=str(ROOT / "experiments" / "pfllib_fmnist.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--round", type=int, default=2)
    parser.add_argument("--hook", action="store_true", help="also time the analysis hook's work")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    figures = summary(profile(cfg, args.round, args.hook))
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}, indent=2))


if __name__ == "__main__":
    main()
