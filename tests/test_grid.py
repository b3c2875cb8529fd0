"""`fedlayer grid`: settings x strategies x seeds, the matrix (rank, regret), its report, resuming."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import tomli_w

from fedlayer.cli import main
from fedlayer.config import ConfigError
from fedlayer.grid import Grid, Setting, check_same_grid, grid_manifest
from fedlayer.run import files
from fedlayer.run.grid_report import best_per_setting, grid_matrix, matrix_figure, matrix_markdown

ROOT = Path(__file__).resolve().parents[1]


def table(means: dict[str, float], std: float = 0.01) -> pd.DataFrame:
    """A compare table's columns the matrix reads."""
    return pd.DataFrame(
        {
            "strategy": list(means),
            "seeds": 2,
            "final_personalized_acc_pooled": list(means.values()),
            "final_personalized_acc_pooled_std": std,
        }
    )


def test_rank_and_regret_per_setting() -> None:
    matrix = grid_matrix(
        {
            "a": table({"fedavg": 0.5, "fedper": 0.9, "local": 0.9}),
            "b": table({"fedavg": 0.8, "fedper": 0.7, "local": math.nan}),
        }
    )
    a = matrix[matrix["setting"] == "a"].set_index("strategy")
    assert a["rank"].tolist() == [3, 1, 1]  # a tie shares the better rank
    assert a["regret"].tolist() == pytest.approx([0.4, 0.0, 0.0])
    b = matrix[matrix["setting"] == "b"].set_index("strategy")
    assert b.loc["fedavg", "rank"] == 1 and b.loc["fedper", "regret"] == pytest.approx(0.1)
    assert math.isnan(b.loc["local", "rank"]) and math.isnan(b.loc["local", "regret"])
    text = matrix_markdown(matrix)
    assert "| fedper | 90.00 ± 1.00 (#1) | 70.00 ± 1.00 (#2) | 1.50 |" in text
    assert "| fedavg | 40.00 | 0.00 | 20.00 |" in text
    best = best_per_setting(matrix, {"a": "first"})
    assert best[["setting", "about", "best", "runner-up"]].values.tolist() == [
        ["a", "first", "fedper", "local"],
        ["b", "", "fedavg", "fedper"],
    ]
    assert best["margin (points)"].tolist() == ["0.00", "10.00"]
    figure = matrix_figure(matrix, seeds=2)
    assert "regret" in figure.axes[1].get_ylabel() and "#rank" in figure._suptitle.get_text()


def test_a_setting_is_a_table_of_config_overrides(tmp_path: Path) -> None:
    setting = Setting.parse(
        "rotate", {"about": "4 rotations", "data": {"feature_shift": "rotate", "alpha": 5}}
    )
    assert setting.overrides == ('data.feature_shift="rotate"', "data.alpha=5")
    assert Setting.parse("Dir(0.1)", {}).folder == "Dir_0.1"
    path = tmp_path / "g.toml"
    path.write_text('seed = 3\n[grid]\nstrategies = ["fedavg"]\n[grid.settings.x]\ndata = { alpha = 1.0 }\n')
    grid = Grid.read(path)
    assert (
        grid.experiment == {"seed": 3}
        and grid.seeds == (0,)
        and grid.settings[0].overrides == ("data.alpha=1.0",)
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[data]\nalpha = 1.0\n", "grid: "),
        (
            "[grid]\nstrategy = ['fedavg']\n",
            "grid.strategy: unknown key; allowed: strategies, seeds, settings",
        ),
        (
            "[grid]\nstrategies = ['fedavg']\nseeds = [0.5]\n[grid.settings.x]\n",
            "grid.seeds: expected a list",
        ),
        ("[grid]\nstrategies = ['fedavg']\n", "grid.settings: expected at least one"),
        (
            "[grid]\nstrategies = ['a']\n[grid.settings]\n'a b' = {}\n'a_b' = {}\n",
            "grid.settings.a b: its folder name 'a_b'",
        ),
        ("[grid]\nstrategies = ['a']\n[grid.settings]\nx = 1\n", "grid.settings.x: expected a table"),
    ],
)
def test_bad_grid_files_are_one_line_errors(text: str, fragment: str, tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")) as err:
        Grid.read(path)
    assert "\n" not in str(err.value)


def test_a_cell_that_cannot_run_is_named_before_anything_is_written(
    tiny_fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        f"[data]\nroot = '{tiny_fmnist}'\nmin_partition_size = 5\n[federation]\nclients = 3\n"
        "[grid]\nstrategies = ['fedavg']\n[grid.settings.ok]\n[grid.settings.bad]\ndata = { domains = 9, "
        "feature_shift = 'rotate' }\n"
    )
    out = tmp_path / "grid"
    assert main(["grid", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlayer: error: grid.settings.bad: data.domains: 9 is not allowed"), err
    assert len(err.splitlines()) == 1 and not out.exists()


GRID = """\
seed = 0
[data]
root = "{root}"
min_partition_size = 5
[federation]
clients = 3
rounds = 1
[train]
batch_size = 16
evaluate_before = false

[grid]
strategies = ["fedavg", "local"]
seeds = [0]

[grid.settings.rotate]
about = "feature shift: 3 rotations, IID labels"
data = {{ partitioner = "iid", feature_shift = "rotate", domains = 3 }}

[grid.settings."concept shift"]
about = "label permutation per client"
data = {{ label_shift = "permute" }}
"""


@pytest.mark.slow
def test_a_tiny_grid_through_the_cli(
    tiny_fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(GRID.format(root=tiny_fmnist))
    out = tmp_path / "grid"
    assert main(["grid", str(path), "--out", str(out)]) == 0
    with open(out / "matrix.csv", newline="") as fh:
        matrix = list(csv.DictReader(fh))
    assert [(r["setting"], r["strategy"]) for r in matrix] == [
        ("rotate", "fedavg"),
        ("rotate", "local"),
        ("concept shift", "fedavg"),
        ("concept shift", "local"),
    ]
    for folder, setting in (("rotate", "rotate"), ("concept_shift", "concept shift")):
        with open(out / "settings" / folder / "table.csv", newline="") as fh:
            per_setting = {
                r["strategy"]: float(r["final_personalized_acc_pooled"]) for r in csv.DictReader(fh)
            }
        rows = {r["strategy"]: r for r in matrix if r["setting"] == setting}
        assert {s: float(r["mean"]) for s, r in rows.items()} == pytest.approx(per_setting, abs=1e-6)
        best = max(per_setting.values())
        for strategy, row in rows.items():
            assert float(row["regret"]) == pytest.approx(best - per_setting[strategy], abs=1e-6)
            assert float(row["rank"]) == 1 + sum(v > per_setting[strategy] for v in per_setting.values())
    partition = json.loads(
        (out / "settings" / "rotate" / "runs" / "local-seed0" / "partition.json").read_text()
    )
    assert [c["domain"] for c in partition["clients"]] == [0, 1, 2]
    report, report_matrix = (out / "report.md").read_text(), (out / "matrix.md").read_text()
    assert "## Best method per setting" in report and "| concept shift | label permutation" in report
    assert (out / "matrix.png").stat().st_size > 0

    capsys.readouterr()
    assert main(["grid", str(path), "--out", str(out)]) == 0  # resumable: nothing left to run
    assert capsys.readouterr().out.count("2 already finished (skipped)") == 2
    manifest = (out / "grid.json").read_text()
    assert main(["grid", str(path), "--out", str(out), "--settings", "rotate", "--strategies", "local"]) == 0
    assert (out / "grid.json").read_text() == manifest  # a subset call keeps the rest of the grid in view
    assert [r["strategy"] for r in json.loads((out / "settings/rotate/sweep.json").read_text())["runs"]] == [
        "fedavg",
        "local",
    ]
    assert (out / "matrix.md").read_text() == report_matrix
    other = ["--settings", "rotate", "--set", "train.lr=0.5"]  # refused before anything is written
    assert main(["grid", str(path), "--out", str(out), *other]) == 2
    assert (out / "grid.json").read_text() == manifest

    matrix_md, report_md = (out / "matrix.md").read_text(), report
    for name in ("matrix.md", "matrix.csv", "matrix.png", "report.md"):
        (out / name).unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "matrix.md").read_text() == matrix_md and (out / "report.md").read_text() == report_md
    assert (out / "matrix.png").exists()


def test_a_grid_directory_refuses_other_overrides_or_another_base_experiment(tmp_path: Path) -> None:
    """A setting run first into an existing grid directory has no compare directory to refuse it: the grid's
    own manifest must (it used to take the new call's overrides and base experiment silently)."""
    path = tmp_path / "g.toml"
    path.write_text(
        "[train]\nlr = 0.01\n[grid]\nstrategies = ['fedavg']\n[grid.settings.a]\n[grid.settings.b]\n"
    )
    grid, out, held = Grid.read(path), tmp_path / "out", ["federation.rounds=2"]
    check_same_grid(out, grid, ["anything=1"])  # a new directory
    out.mkdir()
    (out / files.GRID).write_text(json.dumps(grid_manifest(out, path, grid.only(["a"]), [], [0], held)))
    (out / files.GRID_EXPERIMENT).write_text(tomli_w.dumps(grid.experiment))
    check_same_grid(out, grid.only(["b"]), held)  # another setting of the same experiment
    with pytest.raises(
        ConfigError, match=r"^--set: .* \[federation.rounds=2\]; give the same or another --out$"
    ):
        check_same_grid(out, grid.only(["b"]), ["federation.rounds=3"])
    path.write_text(path.read_text().replace("0.01", "0.02"))
    with pytest.raises(ConfigError, match="^grid: .* holds a grid of another base experiment"):
        check_same_grid(out, Grid.read(path).only(["b"]), held)


def test_settings_choose_a_subset_by_name(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        "[grid]\nstrategies = ['fedavg']\n[grid.settings.a]\n[grid.settings.b]\n[grid.settings.c]\n"
    )
    grid = Grid.read(path)
    assert [s.name for s in grid.only(["c", "a"]).settings] == ["a", "c"]
    assert grid.only([]) == grid
    with pytest.raises(ConfigError, match="--settings: 'd' is not a setting of the grid; settings: a, b, c"):
        grid.only(["d"])


def test_the_shipped_grid_has_the_issues_settings() -> None:
    grid = Grid.read(ROOT / "experiments" / "grid.toml")
    assert len(grid.settings) == 8 and grid.seeds == (0, 1)
    from strategies import ALGORITHMS

    names = {spec.split("{")[0] for spec in grid.strategies}
    assert names == set(ALGORITHMS) - {"partial"}  # every algorithm fedlayer has (partial needs a block list)
    assert grid.experiment["model"] == {"name": "pfllib_cnn", "norm": "batch"}  # FedBN's norms for all


def fake_run(path: Path, name: str, shared: list[str], by_round: list[list[str]] | None = None) -> Path:
    """The files of a finished run the sharing map reads: the strategy, its shared blocks, their history."""
    path.mkdir(parents=True)
    (path / "config.resolved.toml").write_text(f"[strategy]\nname = '{name}'\n")
    (path / "layers.json").write_text(json.dumps({"shared_blocks": shared}))
    if by_round is not None:
        rounds = {str(r): {"shared": blocks} for r, blocks in enumerate(by_round, start=1)}
        (path / "layers_by_round.json").write_text(json.dumps({"blocks": BLOCKS, "rounds": rounds}))
    return path


BLOCKS = ["conv1", "conv2", "fc1", "fc2"]


def test_the_sharing_map_sets_each_rule_beside_the_best_fixed_split(tmp_path: Path) -> None:
    from fedlayer.run.sharing_map import setting_sharing, sharing_figure, sharing_markdown
    from strategies.algorithms import ALGORITHMS, is_fixed_split

    assert [n for n in ALGORITHMS if is_fixed_split(n)] == [
        *("fedavg", "fedprox", "fedper", "lgfedavg", "fedbn", "fedrep", "fedbabu", "local", "partial")
    ]

    seed0 = fake_run(tmp_path / "m0", "lmc", BLOCKS, [BLOCKS, BLOCKS[:2], BLOCKS[:1]])
    seed1 = fake_run(tmp_path / "m1", "lmc", BLOCKS, [BLOCKS, BLOCKS[:3], BLOCKS[:1]])
    groups = {
        "lmc": [seed0, seed1],
        "fedavg": [fake_run(tmp_path / "a", "fedavg", BLOCKS)],
        "fedper": [fake_run(tmp_path / "p", "fedper", BLOCKS[:3])],
        "ditto": [fake_run(tmp_path / "d", "ditto", BLOCKS)],  # best, but not a fixed split
        "local": [fake_run(tmp_path / "l", "local", [])],
    }
    means = {"lmc": 0.9, "fedavg": 0.7, "fedper": 0.91, "ditto": 0.95, "local": math.nan}
    sharing = setting_sharing("dir", groups, means, is_fixed_split)
    assert sharing is not None and len(sharing.dynamic) == 1
    rule = sharing.dynamic[0]
    assert rule.shared.tolist() == [[1, 1, 1], [1, 1, 0], [1, 0.5, 0], [1, 0, 0]]  # share of the 2 seeds
    assert rule.final == ["conv1"]
    assert sharing.best_fixed is not None and sharing.best_fixed.label == "fedper"
    assert sharing.best_fixed.blocks == ["conv1", "conv2", "fc1"]
    text = sharing_markdown([sharing])
    assert "| dir | lmc | 90.00 | conv1 | fedper | 91.00 | conv1, conv2, fc1 | -1.00 |" in text
    figure = sharing_figure([sharing])
    assert "round" in figure.axes[0].get_xlabel() and "fedper" in figure.axes[1].get_title()
    assert setting_sharing("dir", {"fedavg": groups["fedavg"]}, means, is_fixed_split) is None
