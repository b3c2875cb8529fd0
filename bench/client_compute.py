"""Client compute and uplink of strategies side by side: the real server and ClientApp, in this process.

Runs ``fedlayer``'s real server (:func:`fedlayer.server.app.run_server`: the strategy, its sharing policy,
sampling, checkpoints) on a grid that hands every instruction straight to the real ClientApp functions
(:mod:`fedlayer.client.app`: train, evaluate, the partition query) in this process, one torch thread as in a
client actor, and times each call in CPU seconds of this process (load-independent) and wall seconds. No
Flower transport and no Ray: what is measured is what a client computes. The strategies run one after the
other on the same cell; the figures are per round, summed over the round's clients, and the ratios are
against the first strategy (FedAvg by default), over rounds >= 2 (round 1 has no own copy to mix).

The cell is a grid setting (``--grid`` + ``--setting``) or an experiment file (``--config``), with
``--set`` overrides; strategies are written as in ``fedlayer compare`` (``NAME{KEY=VALUE;...}``).

    .venv/bin/python bench/client_compute.py --setting dir0.1 [--rounds 6] [--json FILE]
    .venv/bin/python bench/client_compute.py --config experiments/pfllib_fmnist.toml --rounds 3 \\
        --strategies "fedavg,lmc{strategy.lmc_criterion='mixing'}"
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import tomli_w
import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from profile_round import Stopwatch  # bench/: the same CPU + wall timer

from fedlayer.client import app as client_app
from fedlayer.compare import Variant, split_specs
from fedlayer.config import Config, load_config
from fedlayer.contract import CONFIG, SERVER_ROUND
from fedlayer.grid import Grid as GridFile
from fedlayer.run.rundir import RunDir
from fedlayer.server.app import run_server

ROOT = Path(__file__).resolve().parents[1]
MIXING = "lmc{strategy.lmc_criterion='mixing'}"
Handler = Callable[[Message, Context], Message]
HANDLERS: dict[str, Handler] = {
    "train": client_app.train,
    "evaluate": client_app.evaluate_personalized,
    "query.partition": client_app.query_partition,
}


class InProcessGrid(Grid):
    """A grid whose nodes are the ClientApp's functions called in this process: a pushed instruction is
    answered at once, and the call's CPU and wall seconds are summed per (round, message type)."""

    def __init__(self, clients: int) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp's
        self.contexts = {
            pid + 1: Context(1, pid + 1, {"partition-id": pid, "num-partitions": clients}, RecordDict(), {})
            for pid in range(clients)
        }
        self.replies: dict[str, Message] = {}
        self.watch = Stopwatch()  # "<round> <message type>" -> CPU / wall seconds summed over clients
        self.count = 0
        self._run = Run.create_empty(1)  # one run, id 1, as the contexts say

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self.count += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.count}"
            self.replies[msg.metadata.message_id] = self._answer(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def _answer(self, msg: Message) -> Message:
        kind = msg.metadata.message_type
        config = msg.content.config_records.get(CONFIG)
        server_round = int(config.get(SERVER_ROUND, 0)) if config is not None else 0  # type: ignore[arg-type]
        with self.watch(f"{server_round} {kind}"):
            return HANDLERS[kind](msg, self.contexts[msg.metadata.dst_node_id])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def cell_config(args: argparse.Namespace, variant: Variant) -> Config:
    """The config of one strategy in the chosen cell (``--config``, or ``--grid``'s base + ``--setting``)."""
    overrides = [*variant.overrides, f"federation.rounds={args.rounds}", "analysis.every=0", *args.overrides]
    if args.config:
        return load_config(args.config, overrides)
    grid = GridFile.read(args.grid).only([args.setting])
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder) / "experiment.toml"
        base.write_text(tomli_w.dumps(grid.experiment))
        return load_config(base, [*grid.settings[0].overrides, *overrides])


def measure(cfg: Config) -> dict[str, Any]:
    """Per round: the clients' CPU / wall seconds of train and evaluate instructions and the bytes up."""
    grid = InProcessGrid(cfg.federation.clients)
    run = RunDir.create(Path(tempfile.mkdtemp(prefix="fedlayer-compute-")) / "run")
    run_server(grid, cfg, run, client_state=True)
    rows = run.read_jsonl()
    rounds = range(1, cfg.federation.rounds + 1)
    return {
        "train_cpu": [grid.watch.cpu[f"{r} train"] for r in rounds],
        "evaluate_cpu": [grid.watch.cpu[f"{r} evaluate"] for r in rounds],
        "train_wall": [grid.watch.seconds[f"{r} train"] for r in rounds],
        "bytes_up": [row["bytes_up"] for row in rows],
        "bytes_down": [row["bytes_down"] for row in rows],
        "shared_blocks": rows[-1].get("shared_blocks"),
        "personalized_acc": rows[-1].get("personalized_acc"),
    }


def steady(values: list[float]) -> float:
    """Mean over rounds >= 2."""
    return statistics.mean(values[1:])


def summary(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each strategy's steady figures and their ratios to the first strategy's."""
    first = next(iter(results.values()))
    client = {
        label: steady([t + e for t, e in zip(r["train_cpu"], r["evaluate_cpu"], strict=True)])
        for label, r in results.items()
    }
    base = client[next(iter(results))]
    return {
        label: {
            "client_cpu_s_per_round": round(client[label], 2),
            "train_cpu_s_per_round": round(steady(r["train_cpu"]), 2),
            "evaluate_cpu_s_per_round": round(steady(r["evaluate_cpu"]), 2),
            "client_cpu_ratio": round(client[label] / base, 3),
            "train_cpu_ratio": round(steady(r["train_cpu"]) / steady(first["train_cpu"]), 3),
            "bytes_up_per_round": statistics.mean(r["bytes_up"]),
            "bytes_up_ratio": round(statistics.mean(r["bytes_up"]) / statistics.mean(first["bytes_up"]), 3),
        }
        for label, r in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", default=str(ROOT / "experiments" / "grid.toml"))
    parser.add_argument("--setting", default="dir0.1", help="a setting of --grid (ignored with --config)")
    parser.add_argument("--config", help="an experiment file instead of a grid setting")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--strategies", default=f"fedavg,{MIXING}", help="the first is the reference")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a client actor (federation.client_cpus = 1)
    results = {}
    for spec in split_specs(args.strategies):
        variant = Variant.parse(spec)
        results[variant.label] = measure(cell_config(args, variant))
        print(variant.label, json.dumps({k: v for k, v in results[variant.label].items()}), flush=True)
    figures = {"cell": args.config or f"{args.grid}:{args.setting}", "rounds": args.rounds, "runs": results}
    figures["summary"] = summary(results)
    print(json.dumps(figures["summary"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
