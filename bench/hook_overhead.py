"""Cost of the per-round analysis hook: the same federation with the hook every round vs off.

Both runs in this process, one after the other, same config and seed; prints the median round time of
rounds >= 2 of each and their ratio (goal on CPU: <= 1.10). The hook uses its default settings
(client pairs among up to 4 clients, midpoint only, 2000 evaluation samples) on a Ray actor.

    .venv/bin/python bench/hook_overhead.py [--rounds 4] [--max-samples 12000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fedlayer.config import load_config
from fedlayer.results import RunDir
from fedlayer.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]


def round_times(overrides: list[str]) -> list[float]:
    cfg = load_config(ROOT / "experiments" / "default.toml", overrides)
    run = RunDir.create(Path(tempfile.mkdtemp(prefix="fedlayer-hook-")) / "run")
    simulate(cfg, run)
    return [row["round_seconds"] for row in run.read_jsonl()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-samples", type=int, default=12000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    common = [
        f"federation.rounds={args.rounds}",
        f"data.max_samples={args.max_samples}",
        "train.device='cpu'",
    ]
    off = round_times([*common, "analysis.every=0"])
    on = round_times([*common, "analysis.every=1"])
    result = {
        "rounds": args.rounds,
        "max_samples": args.max_samples,
        "round_s": {"hook_off": [round(t, 2) for t in off], "hook_every_round": [round(t, 2) for t in on]},
        "steady_round_ratio": round(statistics.median(on[1:]) / statistics.median(off[1:]), 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
