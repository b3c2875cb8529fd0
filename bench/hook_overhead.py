"""Cost of the per-round analysis hook: the same federation with the hook every round vs off.

All runs in this process, one after the other, same config and seed (training is deterministic, so every
run analyses the same client models); prints the median round time of rounds >= 2 of each run and its ratio
to the run without the hook (goal on CPU: <= 1.10). The hook runs with its defaults (client pairs among up to
4 clients, midpoint only, on a Ray actor), once per ``--samples`` value (evaluation samples per pair); for
every value but the first, the differences of its barriers from the first value's (mean, median, 90th
percentile, largest) show what the smaller evaluation set costs in precision.

    .venv/bin/python bench/hook_overhead.py [--rounds 4] [--max-samples 12000] [--samples 2000 500]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from fedlayer.config import load_config
from fedlayer.run.readers import read_barriers
from fedlayer.run.rundir import RunDir
from fedlayer.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]
KEY = ["round", "client_a", "client_b", "kind", "base", "block"]


def run(overrides: list[str]) -> RunDir:
    cfg = load_config(ROOT / "experiments" / "default.toml", overrides)
    out = RunDir.create(Path(tempfile.mkdtemp(prefix="fedlayer-hook-")) / "run")
    simulate(cfg, out)
    return out


def steady(out: RunDir) -> float:
    """Median round time of rounds >= 2 (round 1 also starts the actors)."""
    return statistics.median(row["round_seconds"] for row in out.read_jsonl()[1:])


def differences(reference: pd.DataFrame, other: pd.DataFrame) -> dict[str, float]:
    """|barrier difference| over the rows both runs measured: mean, median, 90th percentile, largest; and the
    reference's mean |barrier| for scale."""
    joined = reference.merge(other, on=KEY, suffixes=("_ref", "_other"))
    diff = (joined["barrier_ref"] - joined["barrier_other"]).abs()
    figures = {"rows": len(joined), "mean": diff.mean(), "median": diff.median(), "p90": diff.quantile(0.9)}
    figures |= {"max": diff.max(), "mean_abs_barrier": joined["barrier_ref"].abs().mean()}
    return {k: round(float(v), 4) for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-samples", type=int, default=12000)
    parser.add_argument("--samples", type=int, nargs="+", default=[2000])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    common = [f"federation.rounds={args.rounds}", f"data.max_samples={args.max_samples}"]
    common.append("train.device='cpu'")
    off = run([*common, "analysis.every=0"])
    hooked = {n: run([*common, "analysis.every=1", f"analysis.samples={n}"]) for n in args.samples}
    reference = read_barriers(hooked[args.samples[0]].path)
    result: dict[str, Any] = {
        "rounds": args.rounds,
        "max_samples": args.max_samples,
        "round_s": {"hook_off": [round(r["round_seconds"], 2) for r in off.read_jsonl()]},
        "steady_round_ratio": {},
        "barrier_difference": {},
    }
    for n, out in hooked.items():
        result["round_s"][f"hook_samples_{n}"] = [round(r["round_seconds"], 2) for r in out.read_jsonl()]
        result["steady_round_ratio"][n] = round(steady(out) / steady(off), 3)
        result["barrier_difference"][n] = differences(reference, read_barriers(out.path))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
