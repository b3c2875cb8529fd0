"""Server-process memory over a long run: 100 clients, 10% sampled per round, 50 rounds, small model.

Records the resident set size (VmRSS of this process, which hosts the ServerApp and the Ray driver in
Flower's simulation) after every round and fits a line over rounds >= 5: flat within noise is the goal.
Personal layers live with the clients (context.state / the run's clients/ folder), so the server should
not grow with the number of clients or rounds.

    .venv/bin/python bench/memory.py [--clients 100] [--rounds 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedlayer.config import load_config
from fedlayer.results import RunDir
from fedlayer.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--strategy", default="fedper")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    cfg = load_config(
        ROOT / "experiments" / "default.toml",
        [
            f"federation.clients={args.clients}",
            f"federation.rounds={args.rounds}",
            "federation.fraction_train=0.1",
            "federation.fraction_evaluate=0.1",
            "model.name='mlp'",
            "data.partitioner='iid'",
            f"data.max_samples={200 * args.clients}",
            "data.max_test_samples=2000",
            "data.min_partition_size=10",
            f"strategy.name='{args.strategy}'",
            "train.device='cpu'",
        ],
    )
    rss: list[float] = []

    def on_round(row: dict[str, Any]) -> None:
        if row["round"] > 0:
            rss.append(rss_mib())

    simulate(cfg, RunDir.create(Path(tempfile.mkdtemp(prefix="fedlayer-mem-")) / "run"), on_round)
    rounds = np.arange(1, len(rss) + 1)
    slope = float(np.polyfit(rounds[4:], rss[4:], 1)[0])
    result = {
        "clients": args.clients,
        "rounds": args.rounds,
        "strategy": args.strategy,
        "rss_mib_first_last": [round(rss[0], 1), round(rss[-1], 1)],
        "rss_mib_every_10": [round(v, 1) for v in rss[::10]],
        "slope_mib_per_round": round(slope, 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
