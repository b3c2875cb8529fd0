"""Strategy comparison over seeds: a resumable sweep of runs; its table, plots and report: report.py."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from fedlayer.config import Config, ConfigError, load_config, parse_value
from fedlayer.inputs import check_before_start, check_out
from fedlayer.run.files import REPORT, SUMMARY, SWEEP, TABLE

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
        from fedlayer.run.readers import read_json

        return read_json(self.path / SUMMARY).get("status") == "finished"


def plan(out: Path, variants: Sequence[Variant], seeds: Sequence[int]) -> list[SweepRun]:
    return [SweepRun(v, seed, out / "runs" / f"{v.folder}-seed{seed}") for v in variants for seed in seeds]


class SweepStopped(Exception):
    """A signal (Ctrl-C) stopped the sweep; the run it interrupted stopped cleanly."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_one(config: str, run: SweepRun, overrides: Sequence[str], tensorboard: bool) -> None:
    """One run as a subprocess (a fresh Ray and Flower per run); its console output goes to run.log.

    A run an earlier sweep left unfinished continues from its last complete round (``fedlayer run --resume``)
    when its resolved config is the one this sweep asks for; otherwise it starts over.
    Raises :class:`SweepStopped` when a SIGINT / SIGTERM of this process stopped the run.
    """
    settings = [*overrides, *run.variant.overrides, f"seed={run.seed}"]
    resume = resumable(config, run, settings)
    if resume:
        args = [sys.executable, "-m", "fedlayer.cli", "run", "--resume", str(run.path)]
    else:
        args = [sys.executable, "-m", "fedlayer.cli", "run", config, "--out", str(run.path), "--overwrite"]
        args += [arg for item in settings for arg in ("--set", item)]
    if tensorboard:
        args.append("--tensorboard")
    run.path.mkdir(parents=True, exist_ok=True)
    with open(run.path.parent / f"{run.path.name}.log", "a" if resume else "w") as log:
        # Its own session: a terminal's Ctrl-C reaches this process only, which passes it on once (with
        # subprocess.run the run got it too, and a SIGKILL 0.25 s later that left its Ray running).
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"COLUMNS": "100"},
            start_new_session=True,
        )
        returncode, signum = _wait_passing_signals(proc)
    if signum:
        raise SweepStopped(signum)
    if returncode != 0:
        raise RuntimeError(f"run {run.path.name} failed (exit {returncode}); see {run.path.name}.log")


def resumable(config: str, run: SweepRun, settings: Sequence[str]) -> bool:
    """Whether ``run`` has a checkpoint of a config equal to ``config`` with ``settings``."""
    from fedlayer.config import to_toml
    from fedlayer.run.files import CHECKPOINT, CONFIG_RESOLVED

    saved = run.path / CONFIG_RESOLVED
    if not (run.path / CHECKPOINT).is_file() or not saved.is_file():
        return False
    return saved.read_text() == to_toml(load_config(config, list(settings)))


def _wait_passing_signals(proc: subprocess.Popen[bytes]) -> tuple[int, int]:
    """Wait for ``proc``, passing the first SIGINT / SIGTERM of this process on to it (it stops cleanly and
    is waited for; later signals change nothing); its exit code and the signal passed on (0: none)."""
    passed = 0

    def pass_on(signum: int, frame: FrameType | None) -> None:
        nonlocal passed
        if not passed:
            passed = signum
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait(), passed
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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


def check_inputs(
    config: str, variants: Sequence[Variant], seeds: Sequence[int], overrides: Sequence[str], out: Path
) -> None:
    """Everything the sweep needs, before anything is written: every run's config loads, its data partitions
    and its layer selector resolves against its model, and ``out`` can hold the sweep."""
    from fedlayer.experiment import release_data

    if not variants:
        raise ConfigError("--strategies: give at least one strategy, e.g. fedavg,fedper,partial[conv1+fc2]")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. 0,1,2")
    twice = next((seed for i, seed in enumerate(seeds) if seed in seeds[:i]), None)
    if twice is not None:
        raise ConfigError(f"--seeds: seed {twice} is given twice")
    folders = [v.folder for v in variants]
    for variant in variants:
        if folders.count(variant.folder) > 1:
            raise ConfigError(f"--strategies: {variant.label!r} names the same runs as another strategy")
    check_out(out, reusable=lambda names: SWEEP in names, reusable_is="a compare directory to resume")
    earlier_runs(out, config, overrides)  # a directory of another cell is refused before anything is written
    load_config(config, list(overrides))  # errors of the shared overrides, named without a variant
    configs = {
        (v.label, seed): _variant_config(config, v, seed, overrides) for seed in seeds for v in variants
    }
    for (label, seed), cfg in configs.items():  # seed by seed: the variants share the cached data
        try:
            check_before_start(cfg)
        except ConfigError as err:
            raise ConfigError(f"--strategies {label!r}, seed {seed}: {err}") from None
    release_data()  # the runs are subprocesses; this process only waits for them


def _variant_config(config: str, variant: Variant, seed: int, overrides: Sequence[str]) -> Config:
    try:
        return load_config(config, [*overrides, *variant.overrides, f"seed={seed}"])
    except ConfigError as err:
        raise ConfigError(f"--strategies {variant.label!r}: {err}") from None


def compare(
    config: str,
    specs: Sequence[str],
    seeds: Sequence[int],
    overrides: Sequence[str],
    out: Path,
    *,
    tensorboard: bool = False,
) -> None:
    from fedlayer.run.report import write_report

    variants = [Variant.parse(spec) for spec in specs]
    check_inputs(config, variants, seeds, overrides, out)
    write_manifest(config, variants, seeds, overrides, out)
    sweep(config, variants, seeds, overrides, out, tensorboard=tensorboard)
    write_report(out)


def write_manifest(
    config: str, variants: Sequence[Variant], seeds: Sequence[int], overrides: Sequence[str], out: Path
) -> None:
    """``out/sweep.json``: what the compare directory holds (``fedlayer report`` and resuming read it)."""
    from fedlayer.run.atomic import write_atomic

    earlier = earlier_runs(out, config, overrides)
    out.mkdir(parents=True, exist_ok=True)
    planned = [
        {"strategy": r.variant.label, "seed": r.seed, "path": str(r.path.relative_to(out))}
        for r in plan(out, variants, seeds)
    ]
    paths = {run["path"] for run in planned}
    runs = [run for run in earlier if run["path"] not in paths] + planned
    manifest = {
        "config": config,
        "seeds": sorted({int(run["seed"]) for run in runs}),
        "overrides": list(overrides),
        "runs": runs,
    }
    write_atomic(out / SWEEP, json.dumps(manifest, indent=2) + "\n")


def earlier_runs(out: Path, config: str, overrides: Sequence[str]) -> list[dict[str, Any]]:
    """The runs an existing ``out/sweep.json`` lists, kept when a sweep with other strategies or seeds is
    added to the directory (its report covers them all); [] for a new directory. Runs of another experiment
    file or other overrides would make one table of different cells: refused, one line."""
    from fedlayer.run.readers import read_json

    if not (out / SWEEP).exists():
        return []
    manifest = read_json(out / SWEEP)
    if Path(manifest["config"]).name != Path(config).name:
        raise ConfigError(
            f"config: {str(out)!r} holds runs of {manifest['config']!r}, not {config!r}; give another --out"
        )
    if list(manifest["overrides"]) != list(overrides):
        held = "; ".join(manifest["overrides"]) or "none"
        raise ConfigError(
            f"--set: {str(out)!r} holds runs made with the overrides [{held}]; give the same or another --out"
        )
    return list(manifest["runs"])


# ----------------------------------------------------------------------------- commands (arguments: cli.py)


def cmd_compare(args: argparse.Namespace) -> int:
    seeds = parse_seeds(args.seeds)
    specs = [s for s in split_specs(args.strategies) if s]
    out = Path(args.out or f"runs/compare-{Path(args.config).stem}")
    return finish(
        out,
        out / TABLE,
        lambda: compare(args.config, specs, seeds, args.overrides, out, tensorboard=args.tensorboard),
    )


def finish(out: Path, summary: Path, sweep: Callable[[], object]) -> int:
    """Run ``sweep``; print its ``summary`` table and where the report is, or the one line of a stop."""
    try:
        sweep()
    except SweepStopped as stop:
        print(stopped_message(out), file=sys.stderr)
        return 128 + stop.signum
    print(summary.read_text())
    print(f"report: {out / REPORT}")
    return 0


def parse_seeds(text: str) -> list[int]:
    seeds = [parse_value(s.strip()) for s in text.split(",") if s.strip()]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"--seeds: {text!r} is not a comma-separated list of integers")
    return seeds


def split_specs(text: str) -> list[str]:
    """Split on commas outside [...] and {...} (lists in a variant's overrides keep their commas)."""
    return [s.strip() for s in re.split(r",(?![^\[]*\])(?![^{]*\})", text)]


def stopped_message(out: Path) -> str:
    return (
        f"fedlayer: interrupted; the finished runs in {out} are kept, the same command continues the "
        "sweep (the interrupted run from its last complete round)"
    )


def cmd_report(args: argparse.Namespace) -> int:
    from fedlayer.run.files import GRID
    from fedlayer.run.grid_report import render_grid
    from fedlayer.run.report import render
    from strategies.algorithms import is_fixed_split

    path = Path(args.dir)
    made = render_grid(path, is_fixed_split) if (path / GRID).exists() else render(path)
    print(f"written under {path}: {len(made)} files ({', '.join(sorted({p.name for p in made}))})")
    return 0
