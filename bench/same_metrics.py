"""Same results before and after a change that must not change behaviour (a refactor, a re-housing).

Runs four scenarios with the fedlayer source tree of each side (``PYTHONPATH=TREE``, the same venv), then
compares every row of their ``metrics.jsonl`` (and ``barriers.csv``, ``layers_by_round.json`` where written)
except timings and Ray node ids:

- ``default``: the default experiment as ``make run`` runs it (``experiments/default.toml``);
- ``fedper``: the default experiment with ``strategy.name = fedper``, 3 rounds, the analysis hook every round;
- ``lmc``: ``experiments/lmc.toml`` at a small size, deciding every 2nd round (6 rounds);
- ``deploy``: ``fedlayer deploy local`` of the default experiment, 2 SuperNodes, 2 rounds.

    git worktree add /tmp/before <commit-before>
    python bench/same_metrics.py --before /tmp/before --after . --out ~/same_metrics

A side's runs are kept and reused (``--rerun`` for fresh ones): the "before" side is run once.
Exit 0 when every scenario is identical, 1 otherwise (the differing rows printed).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

VOLATILE = {
    "round_seconds",
    "client_nodes",
}  # wall-clock, and the Ray node ids of the session: never identical
SMALL_LMC = [
    "federation.rounds=6",
    "strategy.lmc_every=2",
    "data.max_samples=6000",
    "data.min_partition_size=10",
    "strategy.name='lmc'",
    "strategy.lmc_threshold=0.05",
]
SCENARIOS: dict[str, list[str]] = {
    "default": ["run", "experiments/default.toml"],
    "fedper": [
        "run",
        "experiments/default.toml",
        *("--set", "strategy.name='fedper'", "--set", "federation.rounds=3"),
        *("--set", "analysis.every=1", "--set", "analysis.max_clients=3"),
    ],
    "lmc": ["run", "experiments/lmc.toml", *(arg for o in SMALL_LMC for arg in ("--set", o))],
    "deploy": [
        "deploy",
        "local",
        "experiments/default.toml",
        *("--supernodes", "2", "--set", "federation.rounds=2", "--set", "data.max_samples=6000"),
    ],
}


def run_side(tree: Path, out: Path, rerun: bool) -> None:
    env = os.environ | {"PYTHONPATH": str(tree.resolve()), "FLWR_TELEMETRY_ENABLED": "0"}
    for name, args in SCENARIOS.items():
        run_dir = out / name
        if (run_dir / "summary.json").exists() and not rerun:
            continue
        cmd = [sys.executable, "-m", "fedlayer.cli", *args, "--out", str(run_dir), "--overwrite"]
        print(f"[{tree}] {name}: {' '.join(cmd[3:])}", flush=True)
        subprocess.run(cmd, cwd=tree, env=env, check=True)


def rows(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    found = {"metrics.jsonl": [{k: v for k, v in row.items() if k not in VOLATILE} for row in metrics]}
    for name in ("barriers.csv", "layers_by_round.json"):
        path = run_dir / name
        if path.exists() and name.endswith(".csv"):
            found[name] = list(csv.DictReader(path.open()))
        elif path.exists():
            found[name] = [json.loads(path.read_text())]
    return found


def compare(before: Path, after: Path) -> list[str]:
    problems = []
    for name in SCENARIOS:
        a, b = rows(before / name), rows(after / name)
        if a.keys() != b.keys():
            problems.append(f"{name}: files {sorted(a)} != {sorted(b)}")
        for file in sorted(a.keys() & b.keys()):
            if len(a[file]) != len(b[file]):
                problems.append(f"{name}/{file}: {len(a[file])} rows != {len(b[file])}")
            diffs = [i for i, (x, y) in enumerate(zip(a[file], b[file], strict=False)) if x != y]
            problems += [f"{name}/{file} row {i}: {_differing(a[file][i], b[file][i])}" for i in diffs[:3]]
        print(f"{name}: {sum(len(v) for v in a.values())} rows compared", flush=True)
    return problems


def _differing(x: dict[str, Any], y: dict[str, Any]) -> str:
    keys = sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))
    return ", ".join(f"{k}: {x.get(k)!r} != {y.get(k)!r}" for k in keys)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="source tree before the change")
    parser.add_argument("--after", type=Path, required=True, help="source tree after the change")
    parser.add_argument("--out", type=Path, required=True, help="folder for both sides' runs")
    parser.add_argument("--rerun", action="store_true", help="run the 'after' side again even if present")
    args = parser.parse_args()
    run_side(args.before, args.out / "before", rerun=False)
    run_side(args.after, args.out / "after", rerun=args.rerun)
    problems = compare(args.out / "before", args.out / "after")
    for line in problems:
        print(line)
    print("identical" if not problems else f"{len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
