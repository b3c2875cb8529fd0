"""``fedlayer grid``: strategies x seeds x named settings; one compare directory per setting, one matrix.

A grid file is an experiment TOML (the base every cell starts from) plus a ``[grid]`` table::

    [grid]
    strategies = ["fedavg", "fedper", "fedbn"]   # as `fedlayer compare --strategies` takes them
    seeds = [0, 1]

    [grid.settings.rotate]                       # one table per setting: its config overrides
    about = "feature shift: 4 rotations, IID labels"
    data = { partitioner = "iid", feature_shift = "rotate" }

A cell's config is the base, then the setting's overrides, then ``--set``, then the strategy's own overrides
(``fedbn{model.norm='batch'}``), then its seed. Every setting is a compare directory under
``GRID_DIR/settings/<name>/`` (resumable as ``fedlayer compare``'s: finished runs are skipped); the matrix of
every setting's table and the report are written by :mod:`fedlayer.run.grid_report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlayer.compare import (
    Variant,
    check_inputs,
    finish,
    parse_seeds,
    split_specs,
    sweep,
    write_manifest,
)
from fedlayer.config import ConfigError, read_toml
from fedlayer.inputs import check_out
from fedlayer.run.files import GRID, GRID_EXPERIMENT, GRID_SETTINGS, MATRIX
from fedlayer.run.report import write_report

GRID_KEYS = ("strategies", "seeds", "settings")


@dataclass(frozen=True)
class Setting:
    """A named setting of a grid: a one-line description and its config overrides (``--set`` form)."""

    name: str
    about: str
    overrides: tuple[str, ...]

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name).strip("_")

    @classmethod
    def parse(cls, name: str, table: Any) -> Setting:
        key = f"grid.settings.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{key}: expected a table of config overrides, e.g. data = {{ alpha = 0.5 }}")
        about = table.get("about", "")
        if not isinstance(about, str):
            raise ConfigError(f"{key}.about: expected a string, got {about!r}")
        overrides = tuple(_flatten({k: v for k, v in table.items() if k != "about"}))
        return cls(name, about, overrides)


def _flatten(table: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """``{"data": {"alpha": 0.5}}`` as ``data.alpha=0.5`` (values written as TOML)."""
    import tomli_w

    for key, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}=" + tomli_w.dumps({"v": value}).removeprefix("v = ").strip()


@dataclass(frozen=True)
class Grid:
    """A grid file: the base experiment (every key but ``grid``), strategies, seeds and settings."""

    experiment: dict[str, Any]
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    settings: tuple[Setting, ...]

    @classmethod
    def read(cls, path: str | Path) -> Grid:
        raw = read_toml(path)
        table = raw.pop("grid", None)
        if not isinstance(table, dict):
            raise ConfigError(f"grid: {str(path)!r} has no [grid] table (strategies, seeds, settings)")
        for key in table:
            if key not in GRID_KEYS:
                raise ConfigError(f"grid.{key}: unknown key; allowed: {', '.join(GRID_KEYS)}")
        strategies, seeds = table.get("strategies", []), table.get("seeds", [0])
        if not isinstance(strategies, list) or not all(isinstance(s, str) for s in strategies):
            raise ConfigError(
                f"grid.strategies: expected a list of strategies, e.g. ['fedavg'], got {strategies!r}"
            )
        if not isinstance(seeds, list) or not all(type(s) is int for s in seeds):
            raise ConfigError(f"grid.seeds: expected a list of integers, e.g. [0, 1], got {seeds!r}")
        settings = table.get("settings", {})
        if not isinstance(settings, dict) or not settings:
            raise ConfigError("grid.settings: expected at least one [grid.settings.NAME] table")
        parsed = tuple(Setting.parse(name, value) for name, value in settings.items())
        folders = [s.folder for s in parsed]
        for setting in parsed:
            if not setting.folder or folders.count(setting.folder) > 1:
                raise ConfigError(
                    f"grid.settings.{setting.name}: its folder name {setting.folder!r} is empty or another "
                    "setting's; use letters, digits, _ . -"
                )
        return cls(raw, tuple(strategies), tuple(seeds), parsed)

    def only(self, names: Sequence[str]) -> Grid:
        """The grid with only the settings ``names`` (all when empty), in the file's order."""
        known = [s.name for s in self.settings]
        for name in names:
            if name not in known:
                raise ConfigError(
                    f"--settings: {name!r} is not a setting of the grid; settings: {', '.join(known)}"
                )
        chosen = tuple(s for s in self.settings if not names or s.name in names)
        return dataclasses.replace(self, settings=chosen)


def _checked(setting: Setting, check: Any) -> None:
    try:
        check()
    except ConfigError as err:
        raise ConfigError(f"grid.settings.{setting.name}: {err}") from None


@contextmanager
def _experiment_file(experiment: dict[str, Any]) -> Iterator[Path]:
    """The base experiment as a TOML file of its own (what ``fedlayer run`` reads), for the checks."""
    import tomli_w

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / GRID_EXPERIMENT
        path.write_text(tomli_w.dumps(experiment))
        yield path


def run_grid(
    path: str | Path,
    out: Path,
    overrides: Sequence[str],
    *,
    strategies: Sequence[str] = (),
    seeds: Sequence[int] = (),
    settings: Sequence[str] = (),
) -> Grid:
    """Every cell not finished yet, setting by setting; then each setting's report and the grid's.

    ``strategies`` / ``seeds`` replace the file's lists when given, ``settings`` (names) runs only those.
    Every cell's config, data and layer selectors are checked before anything is written.
    """
    import tomli_w

    from fedlayer.run.grid_report import write_grid_report
    from strategies.algorithms import is_fixed_split

    grid = Grid.read(path).only(settings)
    variants = [Variant.parse(spec) for spec in (strategies or grid.strategies)]
    seeds = list(seeds or grid.seeds)
    check_out(out, reusable=lambda names: GRID in names, reusable_is="a grid directory to resume")
    check_same_grid(out, grid, overrides)
    with _experiment_file(grid.experiment) as base:
        for setting in grid.settings:
            folder = out / GRID_SETTINGS / setting.folder
            cell = [*setting.overrides, *overrides]
            _checked(setting, lambda: check_inputs(str(base), variants, seeds, cell, folder))  # noqa: B023
    out.mkdir(parents=True, exist_ok=True)
    config = out / GRID_EXPERIMENT
    config.write_text(tomli_w.dumps(grid.experiment))
    (out / GRID).write_text(
        json.dumps(grid_manifest(out, path, grid, variants, seeds, overrides), indent=2) + "\n"
    )
    for number, setting in enumerate(grid.settings, start=1):
        folder = out / GRID_SETTINGS / setting.folder
        cell = [*setting.overrides, *overrides]
        print(f"grid: setting {number}/{len(grid.settings)}: {setting.name}")
        write_manifest(str(config), variants, seeds, cell, folder)
        sweep(str(config), variants, seeds, cell, folder)
        write_report(folder)
    write_grid_report(out, is_fixed_split)
    return grid


def check_same_grid(out: Path, grid: Grid, overrides: Sequence[str]) -> None:
    """A grid directory is one experiment: a call with another base experiment or other ``--set`` overrides
    would put cells of different configs into one matrix. Refused with one line, before anything is written
    (a setting's own compare directory checks its cells' overrides too, but not a setting run first now)."""
    if not (out / GRID).exists():
        return
    from fedlayer.run.readers import read_json

    earlier = read_json(out / GRID)
    if list(earlier.get("overrides", [])) != list(overrides):
        held = "; ".join(earlier.get("overrides", [])) or "none"
        raise ConfigError(
            f"--set: {str(out)!r} holds a grid made with the overrides [{held}]; "
            "give the same or another --out"
        )
    written = out / GRID_EXPERIMENT
    if written.exists() and read_toml(written) != grid.experiment:
        raise ConfigError(
            f"grid: {str(out)!r} holds a grid of another base experiment ({earlier.get('grid')!r}); "
            "give another --out"
        )


def grid_manifest(
    out: Path,
    path: str | Path,
    grid: Grid,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    overrides: Sequence[str],
) -> dict[str, Any]:
    """``out/grid.json``: this call's strategies, seeds and settings added to those an earlier call into the
    same directory recorded (a call with ``--settings`` / ``--strategies`` extends the grid's report instead
    of hiding the rest of it; a setting run again gets this call's entry, in its earlier place)."""
    from fedlayer.run.readers import read_json

    earlier = read_json(out / GRID)
    settings = {
        s.name: {
            "name": s.name,
            "about": s.about,
            "overrides": list(s.overrides),
            "path": f"{GRID_SETTINGS}/{s.folder}",
        }
        for s in grid.settings
    }
    merged = {entry["name"]: settings.get(entry["name"], entry) for entry in earlier.get("settings", [])}
    return {
        "grid": str(path),
        "strategies": list(dict.fromkeys([*earlier.get("strategies", []), *(v.label for v in variants)])),
        "seeds": sorted({*earlier.get("seeds", []), *seeds}),
        "overrides": list(overrides),
        "settings": list((merged | settings).values()),  # earlier ones in their order, then new ones
    }


# ----------------------------------------------------------------------------- command (arguments: cli.py)


def cmd_grid(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/grid-{Path(args.grid).stem}")
    specs = [s for s in split_specs(args.strategies or "") if s]
    seeds = parse_seeds(args.seeds) if args.seeds else []
    names = [s.strip() for s in (args.settings or "").split(",") if s.strip()]
    return finish(
        out,
        out / MATRIX,
        lambda: run_grid(args.grid, out, args.overrides, strategies=specs, seeds=seeds, settings=names),
    )
