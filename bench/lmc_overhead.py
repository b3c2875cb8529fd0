"""Cost of barrier-guided sharing: ``lmc`` at its defaults vs ``partial`` sharing the set ``lmc`` ended with.

The default experiment (10 clients, Dirichlet 0.3, CNN) with ``strategy.name = "lmc"`` at its defaults
(a decision every round, costs measured by the clients on 256 of their training samples), then the same
federation with ``strategy.name = "partial"`` and ``strategy.shared`` = the blocks ``lmc`` shared in its last
round. The pair is run ``--repeats`` times, alternating, in this process (a loaded machine slows both alike);
prints each run's round times, the median round time of rounds >= 2 over the repeats and the ratio
lmc / partial (goal on CPU: <= 1.10). The analysis hook is off in both (its own cost: ``hook_overhead.py``).

    python bench/lmc_overhead.py [--rounds 5] [--max-samples 12000] [--repeats 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fedlayer.config import load_config
from fedlayer.run.rundir import RunDir
from fedlayer.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]


def run_rows(overrides: list[str]) -> list[dict[str, Any]]:
    cfg = load_config(ROOT / "experiments" / "default.toml", overrides)
    run = RunDir.create(Path(tempfile.mkdtemp(prefix="fedlayer-lmc-bench-")) / "run")
    simulate(cfg, run)
    return run.read_jsonl()


def steady(rows_of_runs: list[list[dict[str, Any]]]) -> float:
    """Median round time over rounds >= 2 of every run (round 1 starts the actors)."""
    return statistics.median(row["round_seconds"] for rows in rows_of_runs for row in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-samples", type=int, default=12000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    common = [
        f"federation.rounds={args.rounds}",
        f"data.max_samples={args.max_samples}",
        "train.device='cpu'",
        "analysis.every=0",
    ]
    lmc: list[list[dict[str, Any]]] = []
    partial: list[list[dict[str, Any]]] = []
    for _ in range(args.repeats):
        lmc.append(run_rows([*common, "strategy.name='lmc'"]))
        final_set = lmc[-1][-1]["shared_blocks"]
        partial.append(run_rows([*common, "strategy.name='partial'", f"strategy.shared={final_set!r}"]))
    result = {
        "rounds": args.rounds,
        "max_samples": args.max_samples,
        "lmc_shared_sets": [[row["shared_blocks"] for row in rows] for rows in lmc],
        "round_s": {
            "lmc": [[round(row["round_seconds"], 2) for row in rows] for rows in lmc],
            "partial": [[round(row["round_seconds"], 2) for row in rows] for rows in partial],
        },
        "bytes_per_round": {
            "lmc": statistics.mean(row["bytes_up"] + row["bytes_down"] for row in lmc[-1]),
            "partial": statistics.mean(row["bytes_up"] + row["bytes_down"] for row in partial[-1]),
        },
        "steady_round_ratio": round(steady(lmc) / steady(partial), 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
