"""fedlayer at PFLlib's Fashion-MNIST setting next to PFLlib's published figures (issue 13's goals).

Reads the comparison table that `fedlayer report` wrote for the committed full-scale runs and writes
`experiments/results/pfllib_fmnist_full/pfllib.md`: per strategy the final-round and best-round pooled
personalized accuracy (Σ correct / Σ test samples over all clients, as PFLlib reports it), the rounds run,
PFLlib's best-of-2,000-rounds figure, the final round's gap to it and whether the issue's goal held.

    .venv/bin/python experiments/pfllib_comparison.py [COMPARE_DIR]   # default: the committed results
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from fedlayer.run import report
from fedlayer.run.readers import read_json, read_metrics

RESULTS = Path(__file__).resolve().parent / "results" / "pfllib_fmnist_full"
# PFLlib's leaderboard, Fashion-MNIST, practical label skew (Dirichlet 0.1), best of 2,000 rounds
PUBLISHED = {"fedavg": 85.85, "fedper": 97.44, "fedrep": 97.56, "fedbabu": 97.46}
GOAL_POINTS = {"fedavg": 2.0, "fedper": 1.0, "fedrep": 1.0, "fedbabu": 1.0}  # final round within this


def comparison(results: Path = RESULTS) -> pd.DataFrame:
    """One row per strategy of the sweep, in the table's order."""
    table = pd.read_csv(results / "table.csv")
    runs = {entry["strategy"]: results / entry["path"] for entry in read_json(results / "sweep.json")["runs"]}
    rows = []
    for _, row in table.iterrows():
        name = str(row["strategy"])
        published = PUBLISHED.get(name, math.nan)
        final = 100 * row["final_personalized_acc_pooled"]
        goal = GOAL_POINTS.get(name, math.nan)
        rows.append(
            {
                "strategy": name,
                "rounds": len(read_metrics(runs[name])),
                "final pooled (%)": final,
                "best pooled (%)": 100 * row["best_personalized_acc_pooled"],
                "best round": int(row["best_round_pooled"]),
                "PFLlib (%)": published,
                "final − PFLlib": final - published,
                "goal (points)": goal,
                "met": "–" if math.isnan(goal) else ("yes" if final - published >= -goal else "no"),
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
