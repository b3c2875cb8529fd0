"""Figures of the barrier analysis, from a run's ``barriers.csv`` / ``landscape.csv``.

Every ``*_figure`` function returns a matplotlib ``Figure`` (no pyplot state) that says on itself what it
shows: which pairs, how they are aggregated, and what the sign of a barrier means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedlayer.contract import GLOBAL
from fedlayer.run import files
from fedlayer.run.atomic import save_figure
from fedlayer.run.files import LAYERS_BY_ROUND, SHARED_BLOCKS_PLOT
from fedlayer.run.readers import midpoint, read_barriers, read_json, read_landscape

BARRIER = "L(midpoint) − ½[L(A) + L(B)]"
SIGN = "> 0: worse than the two models, < 0: better"
ALL_BLOCKS = "*"  # landscape.csv's block of the all-blocks (full model) row
MAX_LEGEND_ROUNDS = 8  # more analysed rounds than this get a colour bar instead of a legend entry each
MAX_ANNOTATED_CELLS = 160
MAX_ROUND_TICKS = 12


def round_axis(ax: Axes, rounds: Iterable[int]) -> None:
    """An x axis of rounds: a tick at every round shown when they are few, else integer ticks only
    (rounds 1.5, 2.5 do not exist)."""
    ax.set_xlabel("round")
    shown = sorted({int(r) for r in rounds})
    if len(shown) <= MAX_ROUND_TICKS:
        ax.set_xticks(shown)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def describe_pairs(rows: pd.DataFrame) -> str:
    """'1 client–client pair', '3 client–client pairs + 3 client–global pairs': the most in any analysed
    round (of any run, when ``rows`` has a ``run`` column)."""
    keys = [column for column in ("run", "round") if column in rows]
    pairs = rows[[*keys, "client_a", "client_b"]].drop_duplicates()
    kind = np.where(pairs["client_b"] == GLOBAL, "client–global", "client–client")
    counts = pairs.groupby([kind, *(pairs[k] for k in keys)]).size().groupby(level=0).max()
    return " + ".join(f"{n} {name} pair{'s' * (n > 1)}" for name, n in counts.items())


def describe_bases(rows: pd.DataFrame) -> str:
    bases = sorted(set(rows["base"]))
    return "both bases (a, b)" if bases == ["a", "b"] else f"base {', '.join(bases)}"


def layer_grid(barriers: pd.DataFrame) -> pd.DataFrame:
    """Block x round matrix of the midpoint layer-wise barrier, the mean over every pair and base in
    ``barriers`` (and every run, when it holds several); blocks in model order (empty without layer rows)."""
    mid = midpoint(barriers, "layer")
    if mid.empty:
        return pd.DataFrame()
    grid = mid.pivot_table(index="block", columns="round", values="barrier", aggfunc="mean")
    return grid.reindex(mid["block"].unique())


def heatmap_figure(grids: Mapping[str, pd.DataFrame], aggregated: str) -> Figure:
    """Layer x round heatmaps side by side (one per label) on one diverging colour scale centred at 0.

    ``aggregated`` says over what each cell is a mean, e.g. "mean over 1 client–client pair and both bases".
    """
    blocks = max(len(grid) for grid in grids.values())
    width = sum(max(2.4, 1.2 + 0.5 * grid.shape[1]) for grid in grids.values()) + 2.5
    fig = Figure(figsize=(width, 2.2 + 0.32 * blocks), layout="constrained")
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    vmax = max(float(np.nanmax(np.abs(grid.to_numpy()))) for grid in grids.values()) or 1.0
    for ax, (label, grid) in zip(axes, grids.items(), strict=True):
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="coolwarm", vmin=-vmax, vmax=vmax)
        columns = range(0, grid.shape[1], -(-grid.shape[1] // MAX_ROUND_TICKS))  # every n-th round when many
        ax.set_xticks(columns, [str(grid.columns[c]) for c in columns])
        ax.set_yticks(range(len(grid)), grid.index if ax is axes[0] else [""] * len(grid))
        ax.set(xlabel="round", title=label)
        if grid.size <= MAX_ANNOTATED_CELLS:
            for (i, j), value in np.ndenumerate(grid.to_numpy()):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=list(axes), label=f"{BARRIER}\n{SIGN}")
    fig.suptitle(f"Layer-wise loss barrier at α = ½ (one layer interpolated)\n{aggregated}", fontsize=10)
    return fig


def run_heatmap_figure(barriers: pd.DataFrame, title: str = "") -> Figure | None:
    """The heatmap of one run: each cell the mean over the round's pairs and both bases."""
    grid = layer_grid(barriers)
    if grid.empty:
        return None
    mid = midpoint(barriers, "layer")
    return heatmap_figure({title: grid}, f"mean over {describe_pairs(mid)} and {describe_bases(mid)}")


def full_figure(barriers: pd.DataFrame) -> Figure | None:
    """Full-model midpoint barrier over rounds (mean, range over pairs) beside the largest layer-wise one."""
    full = midpoint(barriers, "full")
    if full.empty:
        return None
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    per_round = full.groupby("round")["barrier"].agg(["mean", "min", "max"])
    spread = np.vstack([per_round["mean"] - per_round["min"], per_round["max"] - per_round["mean"]]).clip(0)
    several = bool(spread.any())
    label = "full model: mean over pairs" + ("; bars: min–max over pairs" if several else "")
    ax.errorbar(
        per_round.index,
        per_round["mean"],
        yerr=spread if several else None,
        marker="o",
        capsize=3,
        label=label,
    )
    layer = midpoint(barriers, "layer")
    if not layer.empty:
        worst = layer.groupby(["round", "block"])["barrier"].mean().groupby(level="round").max()
        ax.plot(
            worst.index, worst.to_numpy(), marker="s", label="largest single layer (mean over pairs, bases)"
        )
    ax.axhline(0, color="grey", lw=0.8)
    round_axis(ax, per_round.index)
    ax.set(
        ylabel=f"loss barrier {BARRIER}", title=f"Full vs layer-wise barrier at α = ½, {describe_pairs(full)}"
    )
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)
    return fig


def _round_colours(fig: Figure, axes: Sequence[Axes], rounds: Sequence[int]) -> dict[int, tuple[float, ...]]:
    """One colour per analysed round; a colour bar names them when a legend would be too long."""
    norm = Normalize(min(rounds), max(rounds) if len(rounds) > 1 else min(rounds) + 1)
    cmap = colormaps["viridis"]
    if len(rounds) > MAX_LEGEND_ROUNDS:
        bar = fig.colorbar(ScalarMappable(norm, cmap), ax=list(axes), label="round")
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return {r: cmap(norm(r)) for r in rounds}


def _cumulative_panel(ax: Axes, rows: pd.DataFrame, colours: Mapping[int, tuple[float, ...]]) -> bool:
    """One order's lines, one per round. When the block added at k is the same in every round (all orders
    but ``random``) the x ticks name it; otherwise each round's legend entry lists its sequence."""
    sequences = rows.groupby(["round", "k"])["block"].first().unstack("k")
    same = bool((sequences.nunique() == 1).all())
    curves = rows.groupby(["round", "k"])["barrier"].mean().unstack("k")
    for r, curve in curves.iterrows():
        label = f"round {r}" if same else f"round {r}: {', '.join(sequences.loc[r])}"
        ax.plot(curve.index, curve.to_numpy(), marker=".", color=colours[r], label=label)
    ks = list(sequences.columns)
    labels = [f"{k}\n{sequences[k].iloc[0]}" if same else str(k) for k in ks]
    ax.set_xticks(ks, labels, rotation=90 if same and len(ks) > 8 else 0, fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    xlabel = "k: blocks interpolated, block added at k" if same else "k: blocks interpolated"
    ax.set(title=f"order: {rows['order'].iloc[0]}", xlabel=xlabel)
    return same


def cumulative_figure(barriers: pd.DataFrame) -> Figure | None:
    """Cumulative barrier against k, one panel per order, one line per analysed round (mean over pairs
    and bases); the x ticks (or, for a per-round random order, the legend) name the block added at each k."""
    cumulative = midpoint(barriers, "cumulative")
    if cumulative.empty:
        return None
    orders = list(cumulative["order"].unique())
    rounds = sorted(cumulative["round"].unique())
    k_max = int(cumulative["k"].max())
    fig = Figure(figsize=(min(4.0 + 0.25 * k_max, 9.0) * len(orders) / 1.6 + 1.5, 4.6), layout="constrained")
    axes = fig.subplots(1, len(orders), squeeze=False, sharey=True)[0]
    colours = _round_colours(fig, axes, rounds)
    panels = {
        ax: _cumulative_panel(ax, cumulative[cumulative["order"] == o], colours)
        for ax, o in zip(axes, orders, strict=True)
    }
    axes[0].set_ylabel(f"loss barrier {BARRIER}")
    if len(rounds) <= MAX_LEGEND_ROUNDS:
        # one legend of the rounds, plus one in each panel whose entries carry a per-round block sequence
        fixed = [ax for ax, same in panels.items() if same]
        for ax in [ax for ax, same in panels.items() if not same] + fixed[-1:]:
            ax.legend(fontsize=7)
    fig.suptitle(
        f"Cumulative barrier: the first k blocks of each order interpolated at α = ½\n"
        f"mean over {describe_pairs(cumulative)} and {describe_bases(cumulative)}; "
        "k = all blocks is the full barrier",
        fontsize=10,
    )
    return fig


def predicted_figure(landscape: pd.DataFrame) -> Figure | None:
    """Second-order prediction (−⅛ ΔᵀHΔ) against the measured midpoint barrier, coloured by block, with
    the y = x line of an exact prediction."""
    if landscape.empty:
        return None
    points = landscape.dropna(subset=["predicted_barrier", "measured_barrier"])
    if points.empty:
        return None
    fig = Figure(figsize=(6.2, 5.0), layout="constrained")
    ax = fig.subplots()
    blocks = list(points["block"].unique())
    cmap = colormaps["tab10" if len(blocks) <= 10 else "tab20"]
    for i, block in enumerate(blocks):
        rows = points[points["block"] == block]
        label = "all blocks (full model)" if block == ALL_BLOCKS else block
        ax.scatter(
            rows["predicted_barrier"],
            rows["measured_barrier"],
            s=14,
            alpha=0.8,
            color=cmap(i % cmap.N),
            label=label,
        )
    values = points[["predicted_barrier", "measured_barrier"]].to_numpy()
    lo, hi = float(values.min()), float(values.max())
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="y = x (exact prediction)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(
        xlabel="predicted barrier −⅛ ΔᵀHΔ (second order)",
        ylabel="measured midpoint barrier (single-block path, base a)",
    )
    ax.set_title(
        f"Second-order prediction vs measured barrier\none point per block, round and pair "
        f"({describe_pairs(points)})\nHessian at {', '.join(sorted(set(points['hessian_at'])))}",
        fontsize=10,
    )
    ax.legend(fontsize=7, ncol=1 + len(blocks) // 12, title="block")
    return fig


def save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path, dpi=120)


def plot_analysis(run_dir: Path) -> list[Path]:
    """Every analysis plot that the run's data supports; returns the files written."""
    run_dir = Path(run_dir)
    barriers = read_barriers(run_dir)
    figures = {
        files.BARRIER_HEATMAP: run_heatmap_figure(barriers, run_dir.name),
        files.BARRIER_FULL: full_figure(barriers),
        files.BARRIER_CUMULATIVE: cumulative_figure(barriers),
        files.BARRIER_PREDICTED: predicted_figure(read_landscape(run_dir)),
        SHARED_BLOCKS_PLOT: shared_blocks_figure(read_json(run_dir / LAYERS_BY_ROUND)),
    }
    return [save(fig, run_dir / name) for name, fig in figures.items() if fig is not None]


def shared_blocks_figure(history: Mapping[str, Any]) -> Figure | None:
    """Barrier-guided sharing (``lmc``): block x round, shared (green) or personal (white), with the
    evidence of decision rounds (the cost of sharing each block, or its clients' mean mixing weight); from
    ``layers_by_round.json``."""
    if not history:
        return None
    blocks, rounds = history["blocks"], sorted(history["rounds"], key=int)
    shared = [set(history["rounds"][r]["shared"]) for r in rounds]
    grid = np.array([[block in s for s in shared] for block in blocks], dtype=float)
    evidence = "weights" if any("weights" in history["rounds"][r] for r in rounds) else "costs"
    fig = Figure(figsize=(max(5.5, 2.0 + 0.3 * len(rounds)), 1.8 + 0.3 * len(blocks)), layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1.4, interpolation="nearest")
    if len(rounds) * len(blocks) <= MAX_ANNOTATED_CELLS:
        for j, r in enumerate(rounds):
            for i, block in enumerate(blocks):
                if (cost := history["rounds"][r].get(evidence, {}).get(block)) is not None:
                    ax.text(j, i, f"{cost:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(rounds)), rounds, fontsize=7)
    ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
    ax.set_xlabel("round")
    measured = (
        "clients' mean mixing weight learned that round\n(strategy.lmc_criterion = mixing)"
        if evidence == "weights"
        else "cost of sharing measured that round\n(loss increase; strategy.lmc_statistic over clients)"
    )
    ax.set_title(f"Shared blocks (green) and personal (white) per round\nnumbers: {measured}", fontsize=9)
    return fig


def plot_shared_blocks(run_dir: Path) -> Path | None:
    """``shared_blocks.png`` of an ``lmc`` run (see :func:`shared_blocks_figure`)."""
    fig = shared_blocks_figure(read_json(Path(run_dir) / LAYERS_BY_ROUND))
    return save(fig, Path(run_dir) / SHARED_BLOCKS_PLOT) if fig is not None else None
