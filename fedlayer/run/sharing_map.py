"""Which blocks a dynamic sharing rule shared, per setting of a grid, beside the best fixed split there.

A *dynamic* strategy (``lmc``, either criterion) logs its shared blocks per round (``layers_by_round.json``);
a *fixed split* shares one set of blocks for the whole run and nothing else — no client state, extension or
per-client model (FedAvg, FedProx, FedPer, LG-FedAvg, FedBN, FedRep, FedBABU, local, partial). Which
algorithms are is the registry's knowledge, so the caller passes it (``fixed_split``: strategy name -> bool,
``strategies.algorithms.is_fixed_split``). Per setting, ``sharing.png`` shows for each dynamic strategy the
share of its seeds in which each block was shared in each round, and next to it the blocks of the setting's
best fixed split (highest mean of the compared metric); ``sharing_markdown`` is the same as a table.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedlayer.run.files import CONFIG_RESOLVED, LAYERS, LAYERS_BY_ROUND
from fedlayer.run.readers import read_json


@dataclass(frozen=True)
class DynamicSharing:
    """A dynamic strategy in one setting: ``shared[b, r]`` = share of its seeds that shared block b in round
    r + 1; ``final`` = the blocks shared in the last round by at least half of the seeds."""

    label: str
    mean: float
    blocks: list[str]
    shared: np.ndarray

    @property
    def final(self) -> list[str]:
        return [b for b, share in zip(self.blocks, self.shared[:, -1], strict=True) if share >= 0.5]


@dataclass(frozen=True)
class FixedSplit:
    label: str
    mean: float
    blocks: list[str]  # the blocks it shares


@dataclass(frozen=True)
class SettingSharing:
    setting: str
    dynamic: list[DynamicSharing]
    best_fixed: FixedSplit | None


def shared_share(histories: Sequence[Mapping[str, object]]) -> tuple[list[str], np.ndarray]:
    """Blocks and the block x round share of ``histories`` (``layers_by_round.json`` of each seed) in which
    the block was shared; rounds beyond a shorter history do not count for it."""
    blocks = list(histories[0]["blocks"])  # type: ignore[call-overload]
    rounds = max(len(h["rounds"]) for h in histories)  # type: ignore[arg-type]
    shared, seen = np.zeros((len(blocks), rounds)), np.zeros(rounds)
    for history in histories:
        by_round: Mapping[str, Mapping[str, list[str]]] = history["rounds"]  # type: ignore[assignment]
        for r, record in by_round.items():
            seen[int(r) - 1] += 1
            for i, block in enumerate(blocks):
                shared[i, int(r) - 1] += block in record["shared"]
    return blocks, shared / np.maximum(seen, 1)


def _strategy_name(run: Path) -> str:
    with open(run / CONFIG_RESOLVED, "rb") as fh:
        return str(tomllib.load(fh)["strategy"]["name"])


def setting_sharing(
    setting: str,
    groups: Mapping[str, list[Path]],
    means: Mapping[str, float],
    fixed_split: Callable[[str], bool],
) -> SettingSharing | None:
    """The dynamic strategies of one setting (finished runs ``groups`` by label, their mean ``means``; a
    dynamic run logs ``layers_by_round.json``) and its best fixed split; ``None`` without a dynamic one."""
    dynamic, fixed = [], []
    for label, runs in groups.items():
        if (runs[0] / LAYERS_BY_ROUND).exists():
            blocks, shared = shared_share([read_json(run / LAYERS_BY_ROUND) for run in runs])
            dynamic.append(DynamicSharing(label, means[label], blocks, shared))
        elif fixed_split(_strategy_name(runs[0])) and not np.isnan(means[label]):
            fixed.append(FixedSplit(label, means[label], list(read_json(runs[0] / LAYERS)["shared_blocks"])))
    if not dynamic:
        return None
    best = max(fixed, key=lambda f: f.mean, default=None)
    return SettingSharing(setting, dynamic, best)


def _points(value: float) -> str:
    return "–" if np.isnan(value) else f"{100 * value:.2f}"


def sharing_markdown(settings: Sequence[SettingSharing]) -> str:
    """Per setting and dynamic strategy: its accuracy, the blocks it ended sharing, the best fixed split
    with its accuracy and blocks, and the difference (points; > 0: the rule is ahead)."""
    lines = [
        "| setting | rule | accuracy (%) | shared at the end | best fixed split | accuracy (%) | its shared "
        "blocks | rule − fixed (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in settings:
        fixed = s.best_fixed
        for d in s.dynamic:
            cells = [
                s.setting,
                d.label,
                _points(d.mean),
                ", ".join(d.final) or "none",
                fixed.label if fixed else "–",
                _points(fixed.mean) if fixed else "–",
                (", ".join(fixed.blocks) or "none") if fixed else "–",
                _points(d.mean - fixed.mean) if fixed else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sharing_figure(settings: Sequence[SettingSharing]) -> Figure:
    """One row per setting: each dynamic strategy's block x round share of seeds sharing the block (green =
    shared in every seed, white = in none), and the best fixed split's blocks as one column."""
    columns = max(len(s.dynamic) for s in settings)
    rounds = max(d.shared.shape[1] for s in settings for d in s.dynamic)
    blocks = max(len(d.blocks) for s in settings for d in s.dynamic)
    fig = Figure(
        figsize=(2.5 + columns * (1.0 + 0.16 * rounds) + 1.4, 0.9 + len(settings) * (0.55 + 0.22 * blocks)),
        layout="constrained",
    )
    axes = fig.subplots(
        len(settings), columns + 1, squeeze=False, width_ratios=[rounds] * columns + [max(3.0, rounds / 5)]
    )
    image = None
    for row, s in zip(axes, settings, strict=True):
        for ax, d in zip(row, s.dynamic, strict=False):
            image = ax.imshow(d.shared, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
            ticks = range(0, d.shared.shape[1], max(1, d.shared.shape[1] // 6))
            ax.set_xticks(list(ticks), [str(t + 1) for t in ticks], fontsize=7)
            ax.set_yticks(range(len(d.blocks)), d.blocks, fontsize=7)
            ax.set_title(f"{s.setting}: {d.label}\n{_points(d.mean)} %", fontsize=8)
        for ax in row[len(s.dynamic) : columns]:
            ax.axis("off")
        _fixed_column(row[-1], s)
    for ax in axes[-1, :columns]:
        ax.set_xlabel("round", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[:, :columns].ravel().tolist(), label="share of seeds sharing the block")
    fig.suptitle(
        "Blocks the dynamic rule shared per round (green) beside the best fixed split of each setting",
        fontsize=9,
    )
    return fig


def _fixed_column(ax: Axes, s: SettingSharing) -> None:
    blocks = s.dynamic[0].blocks
    fixed = s.best_fixed
    if fixed is None:
        ax.axis("off")
        return
    column = np.array([[float(b in fixed.blocks)] for b in blocks])
    ax.imshow(column, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
    ax.set_title(f"best fixed:\n{fixed.label}\n{_points(fixed.mean)} %", fontsize=8)
