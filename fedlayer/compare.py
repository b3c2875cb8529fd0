"""Strategy comparison over seeds: a resumable sweep of runs, a table, plots and a markdown report."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlayer.config import ConfigError, load_config, parse_value

SPEC = re.compile(r"^(?P<name>[a-z0-9_]+)(\[(?P<shared>[^\]]+)\])?(\{(?P<set>[^}]+)\})?$")


@dataclass(frozen=True)
class Variant:
    """One compared strategy: ``fedper``; ``partial[conv1+fc2]`` (personalization averaging of a group);
    ``fedbn{model.norm='batch'}`` (with its own overrides, ``;``-separated)."""

    label: str
    overrides: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str) -> Variant:
        match = SPEC.match(spec.strip())
        if match is None:
            raise ConfigError(
                f"--strategies: {spec!r} is not NAME, partial[PATTERN+PATTERN...] or NAME{{KEY=VALUE;...}}"
            )
        overrides = [f"strategy.name='{match['name']}'"]
        if match["shared"]:
            patterns = [p.strip() for p in match["shared"].split("+")]
            overrides.append("strategy.shared=" + json.dumps(patterns))
        if match["set"]:
            overrides += [item.strip() for item in match["set"].split(";") if item.strip()]
        return cls(spec.strip(), tuple(overrides))

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label).strip("_")


@dataclass(frozen=True)
class SweepRun:
    variant: Variant
    seed: int
    path: Path

    def finished(self) -> bool:
        summary = self.path / "summary.json"
        return summary.exists() and json.loads(summary.read_text()).get("status") == "finished"


def plan(out: Path, variants: Sequence[Variant], seeds: Sequence[int]) -> list[SweepRun]:
    return [SweepRun(v, seed, out / "runs" / f"{v.folder}-seed{seed}") for v in variants for seed in seeds]


def run_one(config: str, run: SweepRun, overrides: Sequence[str], tensorboard: bool) -> None:
    """One run as a subprocess (a fresh Ray and Flower per run); its console output goes to run.log."""
    args = [sys.executable, "-m", "fedlayer.cli", "run", config, "--out", str(run.path), "--overwrite"]
    for item in (*overrides, *run.variant.overrides, f"seed={run.seed}"):
        args += ["--set", item]
    if tensorboard:
        args.append("--tensorboard")
    run.path.mkdir(parents=True, exist_ok=True)
    with open(run.path.parent / f"{run.path.name}.log", "w") as log:
        proc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"COLUMNS": "100"})
    if proc.returncode != 0:
        raise RuntimeError(f"run {run.path.name} failed (exit {proc.returncode}); see {run.path.name}.log")


def sweep(
    config: str,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    overrides: Sequence[str],
    out: Path,
    *,
    tensorboard: bool = False,
) -> list[SweepRun]:
    """Run every variant x seed not finished yet, with a progress bar over the whole sweep."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    runs = plan(out, variants, seeds)
    todo = [run for run in runs if not run.finished()]
    print(f"compare: {len(runs)} runs, {len(runs) - len(todo)} already finished (skipped)")
    columns = (TextColumn("[bold]{task.description}"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("sweep", total=len(runs), completed=len(runs) - len(todo))
        for run in todo:
            progress.update(task, description=escape(f"{run.variant.label} seed {run.seed}"))
            run_one(config, run, overrides, tensorboard)
            progress.advance(task)
    return runs


def _check_inputs(
    config: str, variants: Sequence[Variant], seeds: Sequence[int], overrides: Sequence[str]
) -> None:
    """Every variant's config must load before anything runs."""
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. 0,1,2")
    for variant in variants:
        load_config(config, [*overrides, *variant.overrides])


# ----------------------------------------------------------------------------- summary


def read_metrics(path: Path) -> list[dict[str, Any]]:
    file = path / "metrics.jsonl"
    return (
        [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.exists() else []
    )


def read_barriers(path: Path) -> list[dict[str, str]]:
    file = path / "barriers.csv"
    if not file.exists():
        return []
    with open(file, newline="") as fh:
        return list(csv.DictReader(fh))


def run_summary(path: Path) -> dict[str, float]:
    """Per-run figures of the comparison table (NaN where a run has no such data)."""
    rows = read_metrics(path)
    last = rows[-1]
    summary = {
        "final_personalized_acc": last.get("personalized_acc", np.nan),
        "best_personalized_acc": max(r.get("personalized_acc", np.nan) for r in rows),
        "final_worst10_acc": last.get("personalized_acc_worst10", np.nan),
        "final_global_acc": last.get("global_acc", np.nan),
        "bytes_per_round": float(np.mean([r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in rows])),
        "seconds_per_round": float(np.mean([r["round_seconds"] for r in rows])),
    }
    return summary | barrier_summary(read_barriers(path))


def barrier_summary(rows: list[dict[str, str]]) -> dict[str, float]:
    """Midpoint barriers of the last analysed round: full (mean over pairs), layer-wise mean and max."""
    mid = [r for r in rows if abs(float(r["alpha"]) - 0.5) < 1e-9]
    if not mid:
        return {"final_full_barrier": np.nan, "mean_layer_barrier": np.nan, "max_layer_barrier": np.nan}
    last = max(int(r["round"]) for r in mid)
    at_last = [r for r in mid if int(r["round"]) == last]
    full = [float(r["barrier"]) for r in at_last if r["kind"] == "full"]
    layer = [float(r["barrier"]) for r in at_last if r["kind"] == "layer"]
    return {
        "final_full_barrier": float(np.mean(full)) if full else np.nan,
        "mean_layer_barrier": float(np.mean(layer)) if layer else np.nan,
        "max_layer_barrier": float(np.max(layer)) if layer else np.nan,
    }


COLUMNS = (
    "final_personalized_acc",
    "best_personalized_acc",
    "final_worst10_acc",
    "final_global_acc",
    "bytes_per_round",
    "seconds_per_round",
    "final_full_barrier",
    "mean_layer_barrier",
    "max_layer_barrier",
)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    if np.all(np.isnan(arr)):
        return np.nan, np.nan
    return float(np.nanmean(arr)), float(np.nanstd(arr, ddof=1)) if np.sum(~np.isnan(arr)) > 1 else 0.0


def table(groups: dict[str, list[Path]]) -> list[dict[str, Any]]:
    """One row per strategy: mean and std over seeds of every column."""
    rows = []
    for label, paths in groups.items():
        summaries = [run_summary(p) for p in paths]
        row: dict[str, Any] = {"strategy": label, "seeds": len(paths)}
        for column in COLUMNS:
            row[column], row[f"{column}_std"] = _mean_std([s[column] for s in summaries])
        rows.append(row)
    return rows


def _fmt(value: float, std: float, column: str) -> str:
    if np.isnan(value):
        return "–"
    if column == "bytes_per_round":
        return f"{value / 1e6:.2f} MB ± {std / 1e6:.2f}"
    if column == "seconds_per_round":
        return f"{value:.1f} ± {std:.1f}"
    return f"{value:.4f} ± {std:.4f}"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["strategy", "seeds", *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["strategy"], str(row["seeds"])] + [_fmt(row[c], row[f"{c}_std"], c) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    fields = ["strategy", "seeds"] + [name for c in COLUMNS for name in (c, f"{c}_std")]
    with open(out / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(
            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows
        )
    (out / "table.md").write_text(table_markdown(rows))


# ----------------------------------------------------------------------------- plots and report


def discover(out: Path) -> dict[str, list[Path]]:
    """Finished runs of a compare directory grouped by strategy label (from sweep.json)."""
    manifest = json.loads((out / "sweep.json").read_text())
    groups: dict[str, list[Path]] = {}
    for entry in manifest["runs"]:
        path = out / entry["path"]
        if (path / "summary.json").exists():
            groups.setdefault(entry["strategy"], []).append(path)
    return groups


def plot_accuracy_bands(out: Path, groups: dict[str, list[Path]]) -> Path:
    """Personalized accuracy over rounds per strategy: mean over seeds with a min-max band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for label, paths in groups.items():
        curves = [[r["personalized_acc"] for r in read_metrics(p)] for p in paths]
        length = min(map(len, curves))
        arr = np.array([c[:length] for c in curves])
        rounds = np.arange(1, length + 1)
        ax.plot(rounds, arr.mean(0), marker="o", ms=3, label=label)
        ax.fill_between(rounds, arr.min(0), arr.max(0), alpha=0.2)
    ax.set(xlabel="round", ylabel="personalized accuracy (mean over clients)", title="strategies over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    return out / "accuracy.png"


def plot_heatmaps(out: Path, groups: dict[str, list[Path]]) -> Path | None:
    """Layer x round barrier heatmaps of every strategy side by side (mean over seeds and pairs)."""
    from matplotlib.figure import Figure

    from fedlayer.analysis.plots import layer_grid

    found = {
        label: layer_grid([r for p in paths for r in read_barriers(p)]) for label, paths in groups.items()
    }
    grids = {label: grid for label, grid in found.items() if grid is not None}
    if not grids:
        return None
    fig = Figure(figsize=(3.2 * len(grids) + 1, 1.5 + 0.28 * max(len(g[0]) for g in grids.values())))
    axes = np.atleast_1d(fig.subplots(1, len(grids), squeeze=False)[0])
    vmax = max(float(np.nanmax(np.abs(g[2]))) for g in grids.values()) or 1.0
    for ax, (label, (blocks, rounds, grid)) in zip(axes, grids.items(), strict=True):
        image = ax.imshow(
            grid, aspect="auto", cmap="coolwarm", vmin=-vmax, vmax=vmax, interpolation="nearest"
        )
        ax.set(title=label, xticks=range(len(rounds)), xticklabels=rounds, xlabel="round")
        ax.set_yticks(range(len(blocks)), blocks if ax is axes[0] else [""] * len(blocks))
    fig.colorbar(image, ax=list(axes), label="layer-wise barrier (midpoint)")
    fig.savefig(out / "barrier_heatmaps.png", dpi=120, bbox_inches="tight")
    return out / "barrier_heatmaps.png"


def write_report(out: Path) -> None:
    """table.csv/md, accuracy.png, barrier_heatmaps.png and report.md from the saved runs of ``out``."""
    manifest = json.loads((out / "sweep.json").read_text())
    groups = discover(out)
    rows = table(groups)
    write_table(out, rows)
    plot_accuracy_bands(out, groups)
    heatmaps = plot_heatmaps(out, groups)
    first = next(iter(groups.values()))[0]
    setup = (first / "config.resolved.toml").read_text()
    lines = [
        f"# Strategy comparison: {Path(manifest['config']).name}",
        "",
        f"Strategies: {', '.join(groups)}; seeds: {', '.join(map(str, manifest['seeds']))}; "
        f"overrides: {' '.join(manifest['overrides']) or 'none'}. "
        "Mean ± std over seeds; the same seed gives every strategy the same partitions and initial model.",
        "Personalized accuracy: each client's model (global shared + own personal layers) on its local test "
        "split, mean over clients; worst10 = mean of the worst 10% clients. Global accuracy: the server's "
        "aggregated model on the global test set (not the model anyone uses when layers are personal).",
        "",
        table_markdown(rows),
        "![accuracy](accuracy.png)",
        "",
    ]
    if heatmaps is not None:
        lines += ["![layer-wise barriers](barrier_heatmaps.png)", ""]
    lines += ["## Setup (first run's resolved config)", "", "```toml", setup.strip(), "```", ""]
    (out / "report.md").write_text("\n".join(lines))


def compare(
    config: str,
    specs: Sequence[str],
    seeds: Sequence[int],
    overrides: Sequence[str],
    out: Path,
    *,
    tensorboard: bool = False,
) -> None:
    variants = [Variant.parse(spec) for spec in specs]
    _check_inputs(config, variants, seeds, overrides)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan(out, variants, seeds)
    manifest = {
        "config": config,
        "seeds": list(seeds),
        "overrides": list(overrides),
        "runs": [
            {"strategy": r.variant.label, "seed": r.seed, "path": str(r.path.relative_to(out))} for r in runs
        ],
    }
    (out / "sweep.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sweep(config, variants, seeds, overrides, out, tensorboard=tensorboard)
    write_report(out)


# ----------------------------------------------------------------------------- CLI


def add_parsers(sub: Any) -> None:
    """Register ``compare`` and ``report`` on the ``fedlayer`` CLI."""
    cmp = sub.add_parser("compare", help="run strategies x seeds and write a table, plots and a report")
    cmp.add_argument("config", help="experiment TOML shared by every run")
    cmp.add_argument("--strategies", required=True, help="comma-separated: fedavg,fedper,partial[conv1+fc2]")
    cmp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cmp.add_argument("--out", help="compare directory (default: runs/compare-<config>)")
    cmp.add_argument("--tensorboard", action="store_true", help="per-round TensorBoard logs in every run")
    rep = sub.add_parser("report", help="re-render plots and report of a run or compare directory")
    rep.add_argument("dir", help="run directory or compare directory")


def cmd_compare(args: argparse.Namespace) -> int:
    seeds = _seeds(args.seeds)
    specs = [s for s in _split_specs(args.strategies) if s]
    out = Path(args.out or f"runs/compare-{Path(args.config).stem}")
    compare(args.config, specs, seeds, args.overrides, out, tensorboard=args.tensorboard)
    print((out / "table.md").read_text())
    print(f"report: {out / 'report.md'}")
    return 0


def _seeds(text: str) -> list[int]:
    try:
        return [int(parse_value(s)) for s in text.split(",") if s.strip()]
    except (TypeError, ValueError):
        raise ConfigError(f"--seeds: {text!r} is not a comma-separated list of integers") from None


def _split_specs(text: str) -> list[str]:
    """Split on commas outside [...] and {...} (lists in a variant's overrides keep their commas)."""
    return [s.strip() for s in re.split(r",(?![^\[]*\])(?![^{]*\})", text)]


def cmd_report(args: argparse.Namespace) -> int:
    from fedlayer.analysis.plots import plot_analysis
    from fedlayer.results import RunDir, plot_accuracy

    path = Path(args.dir)
    if (path / "sweep.json").exists():
        write_report(path)
        print(f"report: {path / 'report.md'}")
    elif (path / "metrics.jsonl").exists():
        plot_accuracy(RunDir(path))
        made = plot_analysis(path)
        print(f"plots: {', '.join(p.name for p in made) or 'accuracy.png'}")
    else:
        raise ConfigError(f"report: {str(path)!r} is neither a run directory nor a compare directory")
    return 0
