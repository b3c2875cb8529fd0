"""Reports from saved files: a run's plots, and a compare directory's table, plots and ``report.md``.

``fedlayer report DIR`` re-renders everything here from what a run wrote (read through
:mod:`fedlayer.run.readers`); nothing is recomputed from models. Tables are pandas group-bys over one summary
row per run; figures are matplotlib ``Figure`` objects (no pyplot state).
"""

from __future__ import annotations

import logging
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fedlayer.config import ConfigError
from fedlayer.run.atomic import save_figure, write_atomic
from fedlayer.run.files import (
    ACCURACY_PLOT,
    BARRIER_HEATMAPS,
    CONFIG_RESOLVED,
    METRICS,
    PARTITION,
    PARTITION_PLOT,
    PREDICTION,
    PREDICTION_CSV,
    REPORT,
    SUMMARY,
    SWEEP,
    TABLE,
    TABLE_CSV,
)
from fedlayer.run.readers import (
    midpoint,
    read_barriers,
    read_json,
    read_landscape,
    read_metrics,
)

log = logging.getLogger(__name__)

POOLED = "Σ correct / Σ test samples over all clients (PFLlib's number)"
# metrics.jsonl keys of a run's accuracy plot, with their legend
RUN_CURVES = {
    "global_acc": "global model (server test set)",
    "personalized_acc": "personalized, mean over clients",
    "personalized_acc_pooled": "personalized, pooled: " + POOLED,
    "personalized_acc_worst10": "personalized, mean of the worst 10% clients",
}
# metrics.jsonl keys of compare's accuracy panels, with their axis label
BAND_CURVES = {
    "personalized_acc": "personalized accuracy (%), mean over clients",
    "personalized_acc_pooled": "personalized accuracy (%), pooled over clients",
}


# ----------------------------------------------------------------------------- one run


def accuracy_figure(metrics: pd.DataFrame, title: str = "") -> Figure | None:
    """Accuracy (%) over rounds: the global model and the personalized models (mean, pooled, worst 10%)."""
    from fedlayer.run.plots import round_axis

    if metrics.empty:
        return None
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for key, label in RUN_CURVES.items():
        if key in metrics:  # the evaluated rounds (federation.evaluate_every)
            curve = metrics[["round", key]].dropna()
            if not curve.empty:
                ax.plot(curve["round"], 100 * curve[key], marker="o", ms=3, label=label)
    round_axis(ax, metrics["round"])
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=title)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8)  # below the axes: never over a curve
    return fig


def plot_accuracy(run_dir: Path) -> Path | None:
    """``accuracy.png`` of a run directory (None before its first round)."""
    fig = accuracy_figure(read_metrics(run_dir), Path(run_dir).name)
    if fig is None:
        return None
    return save_figure(fig, Path(run_dir) / ACCURACY_PLOT, dpi=120)


def known_class_names(run_dir: Path) -> tuple[str, ...]:
    """Class names for a ``partition.json`` written before it recorded them: those torchvision knows from the
    dataset's class alone (Fashion-MNIST, MNIST; CIFAR reads them from its data files)."""
    from fedlayer.data.sources import SPECS

    config = Path(run_dir) / CONFIG_RESOLVED
    if not config.exists():
        return ()
    dataset = tomllib.loads(config.read_text()).get("data", {}).get("dataset", "")
    return tuple(getattr(SPECS[dataset].cls, "classes", ())) if dataset in SPECS else ()


def render_run(run_dir: Path) -> list[Path]:
    """Re-render every plot of a run directory from its files; returns the files written."""
    from fedlayer.data.partition import partition_plot
    from fedlayer.run.plots import plot_analysis

    run_dir = Path(run_dir)
    made = [path for path in [plot_accuracy(run_dir)] if path is not None]
    partition = read_json(run_dir / PARTITION)
    if partition:
        names = () if partition.get("class_names") else known_class_names(run_dir)
        made.append(save_figure(partition_plot(partition, names), run_dir / PARTITION_PLOT, dpi=110))
    return made + plot_analysis(run_dir) + write_prediction_table(run_dir)


# ----------------------------------------------------------------------------- Landscaping's prediction


def _spearman(a: pd.Series, b: pd.Series) -> float:
    return float(a.rank().corr(b.rank()))  # Pearson of the ranks (no SciPy needed)


def prediction_table(landscape: pd.DataFrame) -> pd.DataFrame:
    """Per block (``*`` = all blocks, the full model): how well −⅛ ΔᵀHΔ predicts the measured midpoint
    barrier over rounds and pairs — Pearson and Spearman correlation, the ratio measured / predicted
    (median and interquartile range), how often the signs agree, and the round of the largest miss."""
    if landscape.empty:
        return pd.DataFrame()
    points = landscape.dropna(subset=["predicted_barrier", "measured_barrier"])
    rows = []
    for block, group in points.groupby("block", sort=False):
        predicted, measured = group["predicted_barrier"], group["measured_barrier"]
        ratio = measured / predicted.where(predicted != 0)
        miss = (measured - predicted).abs()
        rows.append(
            {
                "block": "* (full model)" if block == "*" else block,
                "points": len(group),
                "pearson": float(predicted.corr(measured)),
                "spearman": _spearman(predicted, measured),
                "ratio_median": float(ratio.median()),
                "ratio_q25": float(ratio.quantile(0.25)),
                "ratio_q75": float(ratio.quantile(0.75)),
                "sign_agreement": float((np.sign(predicted) == np.sign(measured)).mean()),
                "worst_round": int(group.loc[miss.idxmax(), "round"]),
                "worst_miss": float(miss.max()),
            }
        )
    return pd.DataFrame(rows)


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(table: pd.DataFrame, cell: Callable[[object], str] = _fmt) -> str:
    """A plain Markdown table; ``cell`` writes each value (default: numbers to 3 significant digits)."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_prediction_table(run_dir: Path) -> list[Path]:
    """``prediction.md`` / ``.csv`` beside ``barrier_predicted.png`` when the run has landscape rows."""
    table = prediction_table(read_landscape(run_dir))
    if table.empty:
        return []
    write_atomic(run_dir / PREDICTION_CSV, table.to_csv(index=False))
    header = (
        "Predicted (−⅛ ΔᵀHΔ, Hessian at the path midpoint) vs measured midpoint barrier of the single-block"
        " path, per block over rounds and pairs; ratio = measured / predicted.\n\n"
    )
    write_atomic(run_dir / PREDICTION, header + markdown(table))
    return [run_dir / PREDICTION_CSV, run_dir / PREDICTION]


# ----------------------------------------------------------------------------- compare table


@dataclass(frozen=True)
class Column:
    """A column of the comparison table: ``name`` in table.csv (raw value), ``header`` in table.md."""

    name: str
    header: str
    unit: str  # how table.md shows it, see FORMATS
    meaning: str


FORMATS: dict[str, Callable[[float], str]] = {
    "%": lambda v: f"{100 * v:.2f}",  # accuracies as papers print them
    "round": lambda v: f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}",
    "MB": lambda v: f"{v / 1e6:.2f}",
    "s": lambda v: f"{v:.1f}",
    "min": lambda v: f"{v:.1f}",
    "loss": lambda v: f"{v:.3f}",
}

COLUMNS = (
    Column(
        "final_personalized_acc",
        "final acc (%)",
        "%",
        "personalized accuracy at the last round, mean over clients",
    ),
    Column("final_personalized_acc_pooled", "final pooled (%)", "%", f"the same, pooled: {POOLED}"),
    Column(
        "best_personalized_acc",
        "best acc (%)",
        "%",
        "highest personalized accuracy (mean over clients) of any round",
    ),
    Column(
        "best_personalized_acc_pooled",
        "best pooled (%)",
        "%",
        "highest pooled personalized accuracy of any round",
    ),
    Column(
        "best_round",
        "best round",
        "round",
        "the (first) round where the best accuracy (mean over clients) was reached",
    ),
    Column("best_round_pooled", "best round pooled", "round", "the same for the pooled accuracy"),
    Column(
        "final_worst10_acc",
        "worst 10% (%)",
        "%",
        "mean of the worst 10% clients' personalized accuracy, last round",
    ),
    Column(
        "final_global_acc",
        "global (%)",
        "%",
        "the aggregated model on the global test set, last round (unused by clients with personal layers)",
    ),
    Column(
        "bytes_per_round", "MB/round", "MB", "model bytes up + down per round (10^6 bytes), mean over rounds"
    ),
    Column("seconds_per_round", "s/round", "s", "wall-clock seconds per round, mean over rounds"),
    Column(
        "minutes_per_run",
        "min/run",
        "min",
        "minutes of round time: the rounds' wall-clock seconds summed (a resumed run counts each of its "
        "rounds once; start-up excluded)",
    ),
    Column(
        "final_full_barrier",
        "full barrier",
        "loss",
        "full-model midpoint loss barrier at the last analysed round, mean over pairs",
    ),
    Column(
        "mean_layer_barrier",
        "mean layer barrier",
        "loss",
        "layer-wise midpoint barrier at the last analysed round, mean over pairs, bases and layers",
    ),
    Column(
        "max_layer_barrier", "max layer barrier", "loss", "its largest value over pairs, bases and layers"
    ),
)
NAMES = [column.name for column in COLUMNS]


def _best_round(metrics: pd.DataFrame, key: str) -> float:
    values = metrics[key]
    return float(metrics.loc[values.idxmax(), "round"]) if values.notna().any() else math.nan


def run_summary(run_dir: Path) -> dict[str, float]:
    """One run's figures of the comparison table (NaN where the run has no such data)."""
    keys = ["round", "personalized_acc", "personalized_acc_pooled", "personalized_acc_worst10", "global_acc"]
    keys += ["bytes_up", "bytes_down", "round_seconds"]
    metrics = read_metrics(run_dir).reindex(columns=keys)  # a key older runs lack becomes a NaN column
    last = metrics.iloc[-1]
    summary = {
        "final_personalized_acc": last["personalized_acc"],
        "final_personalized_acc_pooled": last["personalized_acc_pooled"],
        "best_personalized_acc": metrics["personalized_acc"].max(),
        "best_personalized_acc_pooled": metrics["personalized_acc_pooled"].max(),
        "best_round": _best_round(metrics, "personalized_acc"),
        "best_round_pooled": _best_round(metrics, "personalized_acc_pooled"),
        "final_worst10_acc": last["personalized_acc_worst10"],
        "final_global_acc": last["global_acc"],
        "bytes_per_round": (metrics["bytes_up"].fillna(0) + metrics["bytes_down"].fillna(0)).mean(),
        "seconds_per_round": metrics["round_seconds"].mean(),
        "minutes_per_run": metrics["round_seconds"].sum(min_count=1) / 60,
    }
    return {key: float(value) for key, value in (summary | barrier_summary(read_barriers(run_dir))).items()}


def barrier_summary(barriers: pd.DataFrame) -> dict[str, float]:
    """Midpoint barriers of the last analysed round: full (mean over pairs), layer-wise mean and max."""
    mid = midpoint(barriers)
    if mid.empty:
        return dict.fromkeys(("final_full_barrier", "mean_layer_barrier", "max_layer_barrier"), math.nan)
    last = mid[mid["round"] == mid["round"].max()]
    layer = last.loc[last["kind"] == "layer", "barrier"]
    return {
        "final_full_barrier": last.loc[last["kind"] == "full", "barrier"].mean(),
        "mean_layer_barrier": layer.mean(),
        "max_layer_barrier": layer.max(),
    }


def summary_table(groups: Mapping[str, Sequence[Path]]) -> pd.DataFrame:
    """One row per strategy: ``seeds``, then the mean and ``_std`` (over seeds, NaN for one seed) of
    every column."""
    runs = pd.DataFrame(
        [{"strategy": label} | run_summary(path) for label, paths in groups.items() for path in paths],
        columns=["strategy", *NAMES],
    )
    grouped = runs.groupby("strategy", sort=False)
    stats = grouped[NAMES].agg(["mean", "std"])
    stats.columns = [name if stat == "mean" else f"{name}_std" for name, stat in stats.columns]
    return stats.reset_index().assign(seeds=grouped.size().to_numpy())[["strategy", "seeds", *stats.columns]]


def _cell(row: pd.Series, column: Column) -> str:
    value, std = row[column.name], row[f"{column.name}_std"]
    if np.isnan(value):
        return "–"
    fmt = FORMATS[column.unit]
    return fmt(value) if np.isnan(std) else f"{fmt(value)} ± {fmt(std)}"


def table_markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(["strategy", "seeds", *(c.header for c in COLUMNS)]) + " |"]
    lines.append("|" + "---|" * (len(COLUMNS) + 2))
    for _, row in table.iterrows():
        cells = [str(row["strategy"]), str(row["seeds"]), *(_cell(row, c) for c in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, table: pd.DataFrame) -> None:
    """table.csv (raw values: accuracies as fractions, bytes) and table.md (as :data:`FORMATS` shows them)."""
    write_atomic(out / TABLE_CSV, table.to_csv(index=False, float_format="%.6g"))
    write_atomic(out / TABLE, table_markdown(table))


# ----------------------------------------------------------------------------- compare plots


def _curves(paths: Sequence[Path], key: str) -> pd.DataFrame:
    """Round x seed matrix of one metric, the rounds every run of ``paths`` has (empty if one lacks it)."""
    series = {}
    for path in paths:
        metrics = read_metrics(path)
        if key not in metrics:
            return pd.DataFrame()
        series[path.name] = metrics.set_index("round")[key]
    return pd.DataFrame(series).dropna()


def accuracy_bands_figure(groups: Mapping[str, Sequence[Path]]) -> Figure:
    """One panel per accuracy (client mean; pooled where runs have it): per strategy the mean over seeds
    and a band from the lowest to the highest seed."""
    from fedlayer.run.plots import round_axis

    curves = {key: {label: _curves(paths, key) for label, paths in groups.items()} for key in BAND_CURVES}
    panels = {key: found for key, found in curves.items() if any(not c.empty for c in found.values())}
    fig = Figure(figsize=(6.5 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    seeds = max(len(paths) for paths in groups.values())
    for ax, (key, found) in zip(axes, panels.items(), strict=True):
        for label, curve in found.items():
            if curve.empty:
                continue
            line = ax.plot(curve.index, 100 * curve.mean(axis=1), marker="o", ms=3, label=label)[0]
            if curve.shape[1] > 1:
                ax.fill_between(
                    curve.index,
                    100 * curve.min(axis=1),
                    100 * curve.max(axis=1),
                    color=line.get_color(),
                    alpha=0.2,
                )
        handles, labels = ax.get_legend_handles_labels()
        if seeds > 1:
            handles.append(Patch(color="grey", alpha=0.3))
            labels.append("band: min–max over seeds")
        round_axis(ax, [r for curve in found.values() for r in curve.index])
        ax.set(ylabel=BAND_CURVES[key])
        ax.grid(alpha=0.3)
        ax.legend(handles, labels, fontsize=8)
    band = "; band: lowest to highest seed" if seeds > 1 else ""
    fig.suptitle(f"Strategies: mean over {seeds} seed{'s' * (seeds > 1)}{band}", fontsize=10)
    return fig


def compare_heatmap_figure(groups: Mapping[str, Sequence[Path]]) -> Figure | None:
    """Layer x round barrier heatmaps of every strategy, each cell the mean over seeds, pairs and bases."""
    from fedlayer.run.plots import describe_bases, describe_pairs, heatmap_figure, layer_grid

    barriers = {
        label: pd.concat([read_barriers(p).assign(run=p.name) for p in paths], ignore_index=True)
        for label, paths in groups.items()
    }
    grids = {label: layer_grid(rows) for label, rows in barriers.items()}
    grids = {label: grid for label, grid in grids.items() if not grid.empty}
    if not grids:
        return None
    layer = midpoint(pd.concat([barriers[label] for label in grids], ignore_index=True), "layer")
    return heatmap_figure(grids, f"mean over seeds, {describe_pairs(layer)} and {describe_bases(layer)}")


# ----------------------------------------------------------------------------- compare report


def discover(out: Path) -> dict[str, list[Path]]:
    """Finished runs of a compare directory grouped by strategy label (from sweep.json)."""
    groups: dict[str, list[Path]] = {}
    for entry in read_json(out / SWEEP)["runs"]:
        path = out / entry["path"]
        if (path / SUMMARY).exists():
            groups.setdefault(entry["strategy"], []).append(path)
    return groups


def _legend() -> list[str]:
    return [f"- **{c.header}** (`{c.name}` in table.csv): {c.meaning}" for c in COLUMNS]


def write_report(out: Path) -> None:
    """table.csv/md, accuracy.png, barrier_heatmaps.png and report.md from the saved runs of ``out``."""
    manifest = read_json(out / SWEEP)
    groups = discover(out)
    table = summary_table(groups)
    write_table(out, table)
    save_figure(accuracy_bands_figure(groups), out / ACCURACY_PLOT, dpi=120)
    heatmaps = compare_heatmap_figure(groups)
    if heatmaps is not None:
        save_figure(heatmaps, out / BARRIER_HEATMAPS, dpi=120)
    first = next(iter(groups.values()))[0]
    setup = (first / CONFIG_RESOLVED).read_text()
    lines = [
        f"# Strategy comparison: {Path(manifest['config']).name}",
        "",
        f"Strategies: {', '.join(groups)}; seeds: {', '.join(map(str, manifest['seeds']))}; "
        f"overrides: {' '.join(manifest['overrides']) or 'none'}. "
        "Mean ± std over seeds (no ± with one seed); the same seed gives every strategy the same partitions "
        "and initial model. Personalized accuracy: each client's model (global shared + own personal layers) "
        "on its local test split. – : the runs have no such data (older runs lack the pooled accuracy).",
        "",
        table_markdown(table),
        *_legend(),
        "",
        "![accuracy](accuracy.png)",
        "",
    ]
    if heatmaps is not None:
        lines += ["![layer-wise barriers](barrier_heatmaps.png)", ""]
    lines += ["## Setup (first run's resolved config)", "", "```toml", setup.strip(), "```", ""]
    write_atomic(out / REPORT, "\n".join(lines))


def render(path: Path) -> list[Path]:
    """``fedlayer report DIR`` of a compare directory (its runs, then table and report) or a run directory
    (a grid directory: :func:`fedlayer.run.grid_report.render_grid`)."""
    path = Path(path)
    if (path / SWEEP).exists():
        made = [file for runs in discover(path).values() for run in runs for file in render_run(run)]
        write_report(path)
        return [*made, path / REPORT]
    if (path / METRICS).exists():
        if read_metrics(path).empty:
            log.warning("%s has no rows: no round of %s completed", path / METRICS, path)
        return render_run(path)
    raise ConfigError(f"report: {str(path)!r} is not a run, compare or grid directory")
