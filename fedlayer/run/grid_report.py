"""A grid directory's summary: the method x setting matrix, its heatmap and ``report.md``.

Each setting's numbers are its compare table's (:func:`fedlayer.run.report.summary_table` over the same
finished runs), so the matrix and the per-setting tables cannot disagree. Per setting, a method's **rank**
is 1 for the highest mean (ties share the better rank) and its **regret** is the best mean of the setting
minus its own, in accuracy points (0 for the winner).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fedlayer.config import ConfigError
from fedlayer.run.files import (
    GRID,
    GRID_EXPERIMENT,
    MATRIX,
    MATRIX_CSV,
    MATRIX_PLOT,
    REPORT,
    SHARING_PLOT,
    SWEEP,
)
from fedlayer.run.readers import read_json
from fedlayer.run.report import POOLED, discover, render, summary_table
from fedlayer.run.sharing_map import SettingSharing, setting_sharing, sharing_figure, sharing_markdown

METRIC = "final_personalized_acc_pooled"
METRIC_TEXT = "final pooled personalized accuracy"


def setting_groups(out: Path) -> dict[str, dict[str, list[Path]]]:
    """Each started setting's finished runs by strategy label, by setting name, in the grid's order."""
    started = (e for e in read_json(out / GRID)["settings"] if (out / e["path"] / SWEEP).exists())
    settings = ((entry["name"], discover(out / entry["path"])) for entry in started)
    return {name: groups for name, groups in settings if groups}


def setting_tables(groups: Mapping[str, Mapping[str, list[Path]]]) -> dict[str, pd.DataFrame]:
    """Each setting's comparison table (finished runs only), by setting name."""
    return {name: summary_table(dict(runs)) for name, runs in groups.items()}


def setting_sharings(
    groups: Mapping[str, Mapping[str, list[Path]]], matrix: pd.DataFrame, fixed_split: Callable[[str], bool]
) -> list[SettingSharing]:
    """The dynamic strategies' shared blocks per setting beside its best fixed split (settings without a
    dynamic strategy left out)."""
    found = []
    for name, runs in groups.items():
        part = matrix[matrix["setting"] == name]
        means = dict(zip(part["strategy"], part["mean"], strict=True))
        sharing = setting_sharing(name, runs, means, fixed_split)
        if sharing is not None:
            found.append(sharing)
    return found


def grid_matrix(tables: Mapping[str, pd.DataFrame], metric: str = METRIC) -> pd.DataFrame:
    """One row per (setting, strategy): ``seeds``, ``mean`` and ``std`` of ``metric`` (a fraction), ``rank``
    in the setting (1 = best; NaN without a value) and ``regret`` = the setting's best mean − this mean."""
    rows = []
    for setting, table in tables.items():
        means = table[metric]
        part = pd.DataFrame(
            {
                "setting": setting,
                "strategy": table["strategy"],
                "seeds": table["seeds"],
                "mean": means,
                "std": table[f"{metric}_std"],
                "rank": means.rank(ascending=False, method="min"),
                "regret": means.max() - means,
            }
        )
        rows.append(part)
    columns = ["setting", "strategy", "seeds", "mean", "std", "rank", "regret"]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


def _pivot(matrix: pd.DataFrame, column: str) -> pd.DataFrame:
    """strategy x setting of one column, in the order strategies and settings first appear."""
    table = matrix.pivot(index="strategy", columns="setting", values=column)
    return table.reindex(index=matrix["strategy"].unique(), columns=matrix["setting"].unique())


def _accuracy(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "–"
    return f"{100 * mean:.2f}" + ("" if np.isnan(std) else f" ± {100 * std:.2f}")


def matrix_markdown(matrix: pd.DataFrame) -> str:
    """Two markdown tables, strategy x setting: accuracy (%) mean ± std with the rank, and regret (points),
    each with the strategy's mean rank / mean regret over the settings."""
    means, stds, ranks, regrets = (_pivot(matrix, c) for c in ("mean", "std", "rank", "regret"))
    settings = list(means.columns)
    head = ["strategy", *settings]
    lines = ["| " + " | ".join([*head, "mean rank"]) + " |", "|" + "---|" * (len(head) + 1)]
    for strategy in means.index:
        cells = [
            _accuracy(means.at[strategy, s], stds.at[strategy, s])
            + ("" if np.isnan(ranks.at[strategy, s]) else f" (#{ranks.at[strategy, s]:.0f})")
            for s in settings
        ]
        lines.append("| " + " | ".join([strategy, *cells, f"{ranks.loc[strategy].mean():.2f}"]) + " |")
    lines += ["", "| " + " | ".join([*head, "mean regret"]) + " |", "|" + "---|" * (len(head) + 1)]
    for strategy in regrets.index:
        cells = ["–" if np.isnan(v) else f"{100 * v:.2f}" for v in regrets.loc[strategy]]
        lines.append(
            "| " + " | ".join([strategy, *cells, f"{100 * regrets.loc[strategy].mean():.2f}"]) + " |"
        )
    return "\n".join(lines) + "\n"


def matrix_figure(matrix: pd.DataFrame, seeds: int) -> Figure:
    """Heatmap strategy x setting: colour = regret (points), text = accuracy mean ± std and rank; each
    setting's best is framed. Title and colour bar say all of it."""
    from matplotlib.patches import Rectangle

    means, stds, ranks, regrets = (_pivot(matrix, c) for c in ("mean", "std", "rank", "regret"))
    rows, cols = means.shape
    label = max(len(str(s)) for s in means.index)  # room for the longest strategy label
    fig = Figure(figsize=(2.0 + 0.065 * label + 1.45 * max(cols, 2), 1.6 + 0.55 * rows), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(100 * regrets.to_numpy(dtype=float), cmap="viridis_r", aspect="auto", vmin=0)
    for i, strategy in enumerate(means.index):
        for j, setting in enumerate(means.columns):
            mean, std, rank = (
                means.at[strategy, setting],
                stds.at[strategy, setting],
                ranks.at[strategy, setting],
            )
            if np.isnan(mean):
                ax.text(j, i, "–", ha="center", va="center", fontsize=8)
                continue
            text = f"{100 * mean:.1f}" + ("" if np.isnan(std) else f"±{100 * std:.1f}") + f"\n#{rank:.0f}"
            dark = regrets.at[strategy, setting] > 0.5 * np.nanmax(regrets.to_numpy(dtype=float))
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
            if rank == 1:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(cols), list(means.columns), rotation=30, ha="right")
    ax.set_yticks(range(rows), list(means.index))
    ax.set(xlabel="setting", ylabel="strategy")
    fig.colorbar(image, ax=ax, label="regret: best of the setting − this (points)")
    over = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    fig.suptitle(
        f"Final pooled personalized accuracy (%), {over}\n#rank in the setting; the best framed red",
        fontsize=9,
    )
    return fig


def best_per_setting(matrix: pd.DataFrame, about: Mapping[str, str]) -> pd.DataFrame:
    """Per setting: the best strategy, its accuracy, the runner-up and the margin (points)."""
    rows = []
    for setting, part in matrix.dropna(subset=["mean"]).groupby("setting", sort=False):
        ordered = part.sort_values("mean", ascending=False, kind="stable")
        best, second = ordered.iloc[0], (ordered.iloc[1] if len(ordered) > 1 else None)
        rows.append(
            {
                "setting": setting,
                "about": about.get(str(setting), ""),
                "best": best["strategy"],
                "accuracy (%)": _accuracy(best["mean"], best["std"]),
                "runner-up": "–" if second is None else second["strategy"],
                "margin (points)": "–" if second is None else f"{100 * (best['mean'] - second['mean']):.2f}",
            }
        )
    return pd.DataFrame(rows)


def write_grid_report(out: Path, fixed_split: Callable[[str], bool]) -> list[Path]:
    """matrix.csv / matrix.md / matrix.png, report.md and (with a dynamic strategy) sharing.png of a grid
    directory, from its settings' runs; ``fixed_split`` tells which strategy names share a fixed set of
    blocks and nothing else (the registry's ``strategies.algorithms.is_fixed_split``)."""
    from fedlayer.run.report import markdown

    manifest = read_json(out / GRID)
    groups = setting_groups(out)
    matrix = grid_matrix(setting_tables(groups))
    if matrix.empty:
        raise ConfigError(f"report: grid directory {str(out)!r} has no finished run yet")
    matrix.to_csv(out / MATRIX_CSV, index=False, float_format="%.6g")
    (out / MATRIX).write_text(matrix_markdown(matrix))
    matrix_figure(matrix, len(manifest["seeds"])).savefig(out / MATRIX_PLOT, dpi=130)
    written = [out / MATRIX_CSV, out / MATRIX, out / MATRIX_PLOT, out / REPORT]
    sharings = setting_sharings(groups, matrix, fixed_split)
    if sharings:
        sharing_figure(sharings).savefig(out / SHARING_PLOT, dpi=130)
        written.append(out / SHARING_PLOT)
    about = {s["name"]: s["about"] for s in manifest["settings"]}
    best = best_per_setting(matrix, about)
    settings = [
        f"- **{s['name']}** ([report]({s['path']}/report.md)): {s['about'] or '–'}; overrides: "
        + (", ".join(f"`{o}`" for o in s["overrides"]) or "none")
        for s in manifest["settings"]
    ]
    lines = [
        f"# Grid: {Path(manifest['grid']).name}",
        "",
        f"Strategies: {', '.join(manifest['strategies'])}; seeds: {', '.join(map(str, manifest['seeds']))}; "
        f"overrides of every cell: {' '.join(manifest['overrides']) or 'none'}. The number compared is the "
        f"{METRIC_TEXT} ({POOLED}) at the last round, mean ± std over seeds; rank 1 = best of the setting; "
        "regret = the setting's best mean − this strategy's, in points.",
        "",
        "## Best method per setting",
        "",
        markdown(best, str) if not best.empty else "No finished runs yet.\n",
        "## Matrix",
        "",
        "![method x setting](matrix.png)",
        "",
        matrix_markdown(matrix),
        *_sharing_section(sharings),
        "## Settings",
        "",
        *settings,
        "",
        f"Base experiment of every cell: `{GRID_EXPERIMENT}`; each setting's folder is a compare directory "
        "(table, accuracy curves, its runs).",
        "",
    ]
    (out / REPORT).write_text("\n".join(lines))
    return written


def _sharing_section(sharings: list[SettingSharing]) -> list[str]:
    if not sharings:
        return []
    return [
        "## What the dynamic rules shared",
        "",
        "Per setting, the blocks each dynamic strategy shared per round (share of seeds) beside the "
        "setting's best fixed split (the best of the strategies that share one set of blocks and nothing "
        "else).",
        "",
        f"![shared blocks per setting]({SHARING_PLOT})",
        "",
        sharing_markdown(sharings),
    ]


def render_grid(path: Path, fixed_split: Callable[[str], bool]) -> list[Path]:
    """``fedlayer report GRID_DIR``: every setting's compare directory, then the matrix and the report."""
    settings = [path / entry["path"] for entry in read_json(path / GRID)["settings"]]
    made = [file for folder in settings if (folder / SWEEP).exists() for file in render(folder)]
    return made + write_grid_report(path, fixed_split)
