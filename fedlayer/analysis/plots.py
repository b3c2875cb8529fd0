"""Plots of the barrier analysis, from barriers.csv / landscape.csv of a run directory."""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

MIDPOINT = 0.5


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _midpoint(rows: Iterable[dict[str, str]], kind: str) -> list[dict[str, str]]:
    return [r for r in rows if r["kind"] == kind and abs(float(r["alpha"]) - MIDPOINT) < 1e-9]


def _mean_by(rows: Iterable[dict[str, str]], *keys: str) -> dict[tuple[str, ...], float]:
    groups: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in keys)].append(float(row["barrier"]))
    return {key: float(np.mean(values)) for key, values in groups.items()}


def layer_grid(rows: list[dict[str, str]]) -> tuple[list[str], list[int], np.ndarray] | None:
    """Blocks, rounds and the block x round matrix of midpoint layer-wise barriers (mean over pairs)."""
    means = _mean_by(_midpoint(rows, "layer"), "block", "round")
    if not means:
        return None
    blocks = list(dict.fromkeys(block for block, _ in means))
    rounds = sorted({int(r) for _, r in means})
    return blocks, rounds, np.array([[means.get((b, str(r)), np.nan) for r in rounds] for b in blocks])


def layer_heatmap(rows: list[dict[str, str]], out: Path) -> Path | None:
    """Layer x round heatmap of the midpoint layer-wise barrier (mean over pairs and bases)."""
    found = layer_grid(rows)
    if found is None:
        return None
    blocks, rounds, grid = found
    fig = Figure(figsize=(max(5.0, 2.5 + 0.35 * len(rounds)), 1.5 + 0.28 * len(blocks)))
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set(
        xticks=range(len(rounds)),
        xticklabels=rounds,
        yticks=range(len(blocks)),
        yticklabels=blocks,
        xlabel="round",
        title="layer-wise barrier (midpoint)",
    )
    fig.colorbar(image, ax=ax, label="loss barrier")
    return _save(fig, out)


def full_curve(rows: list[dict[str, str]], out: Path) -> Path | None:
    """Full-model midpoint barrier over rounds, next to the largest layer-wise barrier."""
    full = _mean_by(_midpoint(rows, "full"), "round")
    if not full:
        return None
    layer = _mean_by(_midpoint(rows, "layer"), "round", "block")
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    rounds = sorted(int(r) for (r,) in full)
    ax.plot(rounds, [full[(str(r),)] for r in rounds], marker="o", label="full model")
    if layer:
        worst = [max(v for (rr, _), v in layer.items() if rr == str(r)) for r in rounds]
        ax.plot(rounds, worst, marker="s", label="max single layer")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="round", ylabel="loss barrier", title="full vs layer-wise barrier")
    ax.legend()
    return _save(fig, out)


def cumulative_curves(rows: list[dict[str, str]], out: Path) -> Path | None:
    """Cumulative barrier against the number of interpolated blocks k, per order (last analysed round)."""
    cumulative = _midpoint(rows, "cumulative")
    if not cumulative:
        return None
    last = str(max(int(r["round"]) for r in cumulative))
    means = _mean_by([r for r in cumulative if r["round"] == last], "order", "k")
    fig = Figure(figsize=(5.5, 3.6))
    ax = fig.subplots()
    for order in dict.fromkeys(o for o, _ in means):
        ks = sorted(int(k) for o, k in means if o == order)
        ax.plot(ks, [means[(order, str(k))] for k in ks], marker=".", label=order)
    ax.set(xlabel="k (blocks interpolated)", ylabel="loss barrier", title=f"cumulative barrier, round {last}")
    ax.legend()
    return _save(fig, out)


def predicted_vs_measured(rows: list[dict[str, str]], out: Path) -> Path | None:
    """Second-order prediction of the midpoint barrier (-1/8 curvature) against the measured one."""
    points = [
        (float(r["predicted_barrier"]), float(r["measured_barrier"]))
        for r in rows
        if r.get("predicted_barrier") not in (None, "") and r.get("measured_barrier") not in (None, "")
    ]
    if not points:
        return None
    predicted, measured = np.array(points).T
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    ax.scatter(predicted, measured, s=12, alpha=0.7)
    lo, hi = float(min(predicted.min(), measured.min())), float(max(predicted.max(), measured.max()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="predicted (second order)", ylabel="measured", title="layer-wise barrier")
    return _save(fig, out)


def _save(fig: Figure, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_analysis(run_dir: Path) -> list[Path]:
    """Every analysis plot that the run's data supports; returns the files written."""
    barriers = read_rows(run_dir / "barriers.csv")
    landscape = read_rows(run_dir / "landscape.csv")
    made = [
        layer_heatmap(barriers, run_dir / "barrier_heatmap.png"),
        full_curve(barriers, run_dir / "barrier_full.png"),
        cumulative_curves(barriers, run_dir / "barrier_cumulative.png"),
        predicted_vs_measured(landscape, run_dir / "barrier_predicted.png"),
    ]
    return [path for path in made if path is not None]
