"""fedlayer at PFLlib's Fashion-MNIST setting next to PFLlib's published figures (issues 13 and 19).

Reads the comparison table that `fedlayer report` wrote for a compare directory of full-scale runs and writes
its `pfllib.md`: per strategy the final-round and best-round pooled personalized accuracy (Σ correct / Σ test
samples over all clients, as PFLlib reports it), the rounds run, s/round and MB/round, PFLlib's
best-of-2,000-rounds figure for that column of its leaderboard, the final round's gap to it and whether the
goal held. The column is the runs' partitioner: Dirichlet(0.1) ("practical") or pathological (2 classes per
client). Goal (issue 19): within 0.5 point for every personalized method with a PFLlib figure; FedAvg's
figure is a best of 2,000 rounds, so FedAvg is reported, not judged.

    .venv/bin/python experiments/pfllib_comparison.py [COMPARE_DIR]   # default: results/pfllib_fmnist_full
"""

from __future__ import annotations

import math
import sys
import tomllib
from pathlib import Path

import pandas as pd

from fedlayer.run import report
from fedlayer.run.readers import read_json, read_metrics

RESULTS = Path(__file__).resolve().parent / "results" / "pfllib_fmnist_full"
# PFLlib's leaderboard, Fashion-MNIST, 20 clients, best of 2,000 rounds, by column (its README's table)
PUBLISHED = {
    "dir0.1": {
        "fedavg": 85.85,
        "fedper": 97.44,
        "fedrep": 97.56,
        "fedbabu": 97.46,
        "ditto": 97.47,
        "fedrod": 97.52,
        "fedala": 97.66,
        "feddbe": 97.69,
        "gpfl": 97.81,
        "fedcp": 97.89,
    },
    "pathological": {
        "fedavg": 80.41,
        "fedper": 99.47,
        "fedrep": 99.56,
        "fedbabu": 99.41,
        "ditto": 99.44,
        "fedrod": 99.52,
        "fedala": 99.57,
        "feddbe": 99.74,
        "gpfl": 99.85,
        "fedcp": 99.66,
    },
}
GOAL_POINTS = 0.5  # final round within this of PFLlib's figure, for every method but FedAvg
NOT_JUDGED = {"fedavg"}


def column(runs: dict[str, Path]) -> str:
    """The leaderboard column of a compare directory: its runs' partitioner."""
    with open(next(iter(runs.values())) / "config.resolved.toml", "rb") as fh:
        partitioner = tomllib.load(fh)["data"]["partitioner"]
    return "pathological" if partitioner == "pathological" else "dir0.1"


def comparison(results: Path = RESULTS) -> pd.DataFrame:
    """One row per strategy of the sweep, in the table's order."""
    table = pd.read_csv(results / "table.csv")
    runs = {entry["strategy"]: results / entry["path"] for entry in read_json(results / "sweep.json")["runs"]}
    published = PUBLISHED[column(runs)]
    rows = []
    for _, row in table.iterrows():
        label = str(row["strategy"])
        name = label.split("{")[0]
        figure = published.get(name, math.nan)
        final = 100 * row["final_personalized_acc_pooled"]
        judged = not math.isnan(figure) and name not in NOT_JUDGED
        rows.append(
            {
                "strategy": label,
                "rounds": len(read_metrics(runs[label])),
                "final pooled (%)": final,
                "best pooled (%)": 100 * row["best_personalized_acc_pooled"],
                "best round": int(row["best_round_pooled"]),
                "s/round": row["seconds_per_round"],
                "MB/round": row["bytes_per_round"] / 1e6,
                "PFLlib (%)": figure,
                "final − PFLlib": final - figure,
                "met (within 0.5)": ("yes" if final - figure >= -GOAL_POINTS else "no") if judged else "–",
            }
        )
    return pd.DataFrame(rows)


def cell(value: object) -> str:
    """Percentages as papers print them (two decimals); no figure: –."""
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def markdown(frame: pd.DataFrame) -> str:
    return report.markdown(frame, cell)


def main() -> None:
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    out = results / "pfllib.md"
    out.write_text(markdown(comparison(results)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
