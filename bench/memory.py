"""Server-process memory over a long run: 100 clients, 10% sampled per round, 50 rounds, small model.

Records the resident set size (VmRSS of this process, which hosts the ServerApp and the Ray driver in
Flower's simulation; also its private heap RssAnon and shared memory RssShmem, which holds the Ray object
store pages this process touched) after every round and fits a line over rounds >= 5: flat within noise is
the goal. Personal layers live on disk (the run's clients/ folder), so the server should not grow with the
number of clients or rounds.

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
from fedlayer.run.rundir import RunDir
from fedlayer.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]


PARTS = ("VmRSS", "RssAnon", "RssShmem")  # resident = private heap + file mappings + shared memory (Ray's)


def rss_mib() -> dict[str, float]:
    """Resident memory of this process and two of its parts, in MiB."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in PARTS:
            found[key] = int(value.split()[0]) / 1024
    return found


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
    rss: list[dict[str, float]] = []

    def on_round(row: dict[str, Any]) -> None:
        if row["round"] > 0:
            rss.append(rss_mib())

    simulate(cfg, RunDir.create(Path(tempfile.mkdtemp(prefix="fedlayer-mem-")) / "run"), on_round)
    rounds = np.arange(1, len(rss) + 1)
    series = {part: [row[part] for row in rss] for part in PARTS}
    vm = series["VmRSS"]
    result = {
        "clients": args.clients,
        "rounds": args.rounds,
        "strategy": args.strategy,
        "rss_mib_first_last": [round(vm[0], 1), round(vm[-1], 1)],
        "rss_mib_every_10": [round(v, 1) for v in vm[::10]],
        "slope_mib_per_round": round(float(np.polyfit(rounds[4:], vm[4:], 1)[0]), 3),
        "slope_by_part": {
            part: round(float(np.polyfit(rounds[4:], values[4:], 1)[0]), 3) for part, values in series.items()
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
