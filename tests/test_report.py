"""Plots and tables a researcher can read without the source, from hand-written run files.

Each figure is built by the function that returns it and inspected (ticks, legends, labels), never compared
as an image; the comparison table is computed from a tiny compare directory written here.
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedlayer.cli import main
from fedlayer.compare import SweepRun, Variant
from fedlayer.data.partition import partition_figure
from fedlayer.run.plots import cumulative_figure, full_figure, predicted_figure, run_heatmap_figure
from fedlayer.run.readers import RunFileError, read_barriers, read_landscape, read_metrics
from fedlayer.run.report import (
    accuracy_bands_figure,
    accuracy_figure,
    compare_heatmap_figure,
    known_class_names,
    prediction_table,
    render,
    summary_table,
    table_markdown,
)
from fedlayer.server.hook import BARRIER_COLUMNS, LANDSCAPE_COLUMNS

BLOCKS = ["conv1", "conv2", "fc1", "fc2"]
FMNIST = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def write_metrics(
    run: Path, rounds: int, *, pooled: bool, offset: float = 0.0, seconds: float = 3.0
) -> list[float]:
    """metrics.jsonl with a personalized accuracy that peaks at round 2; returns the pooled accuracies."""
    run.mkdir(parents=True, exist_ok=True)
    accs = [0.5 + offset + 0.1 * min(r, 2) - 0.05 * max(r - 2, 0) for r in range(1, rounds + 1)]
    rows = []
    for r, acc in enumerate(accs, start=1):
        row = {"round": r, "personalized_acc": acc, "personalized_acc_worst10": acc - 0.2, "global_acc": 0.4}
        row |= {"bytes_up": 1_000_000, "bytes_down": 2_000_000, "round_seconds": seconds}
        if pooled:
            row["personalized_acc_pooled"] = (
                0.5 + offset + 0.05 * r
            )  # best at the last round, unlike the mean
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [row.get("personalized_acc_pooled", np.nan) for row in rows]


def barrier_row(r: int, pair: tuple[str, str], kind: str, block: str = "", **kw: object) -> dict[str, object]:
    row: dict[str, object] = dict.fromkeys(BARRIER_COLUMNS, float("nan"))
    row |= {"round": r, "client_a": pair[0], "client_b": pair[1], "kind": kind, "order": "", "base": ""}
    row |= {"block": block, "k": 1, "alpha": 0.5, "barrier": 0.1 * r} | kw
    return row


def write_barriers(run: Path, rounds: tuple[int, ...], pairs: list[tuple[str, str]]) -> None:
    """Layer rows (both bases), full rows, and cumulative rows for a fixed and a per-round random order."""
    rows = []
    for r, (p, pair) in product(rounds, enumerate(pairs)):
        rows.append(barrier_row(r, pair, "full", k=len(BLOCKS), barrier=0.2 * r + 0.01 * p))
        for base, shift in (("a", -0.02), ("b", 0.0)):
            rows += [
                barrier_row(r, pair, "layer", b, base=base, barrier=0.01 * i + shift)
                for i, b in enumerate(BLOCKS)
            ]
        permutation = BLOCKS[r % 4 :] + BLOCKS[: r % 4]
        for order, sequence in (("shallow", BLOCKS), ("random", permutation)):
            rows += [
                barrier_row(r, pair, "cumulative", block, order=order, base="a", k=k)
                for k, block in enumerate(sequence, start=1)
            ]
    pd.DataFrame(rows, columns=BARRIER_COLUMNS).to_csv(run / "barriers.csv", index=False)


def write_landscape(run: Path) -> None:
    rows = [
        {"round": r, "client_a": "0", "client_b": "1", "block": block, "delta_norm": 1.0, "cosine": 0.5}
        | {"curvature": -8 * p, "predicted_barrier": p, "measured_barrier": 1.2 * p, "hessian_at": "midpoint"}
        for r, (block, p) in product((2, 4), zip([*BLOCKS, "*"], [0.01, 0.02, 0.03, 0.04, 0.1], strict=True))
    ]
    pd.DataFrame(rows, columns=LANDSCAPE_COLUMNS).to_csv(run / "landscape.csv", index=False)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    write_metrics(run, 4, pooled=True)
    write_barriers(run, (2, 4), [("0", "1"), ("0", "2"), ("1", "2")])
    write_landscape(run)
    return run


def integer_ticks(ax: Axes) -> bool:
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    return len(ticks) >= 1 and all(float(t).is_integer() for t in ticks)


def legend_texts(ax: Axes) -> list[str]:
    """The axes' legend, or the figure's when the legend sits below the axes."""
    legend = ax.get_legend() or (ax.figure.legends[0] if ax.figure.legends else None)  # type: ignore[union-attr]
    return [] if legend is None else [text.get_text() for text in legend.get_texts()]


def round_axes(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if ax.get_xlabel() == "round" and ax.lines]


def test_round_axes_have_integer_ticks(run_dir: Path) -> None:
    metrics = read_metrics(run_dir)
    figures = [accuracy_figure(metrics), full_figure(read_barriers(run_dir))]
    figures.append(accuracy_bands_figure({"fedper": [run_dir]}))
    write_barriers(run_dir, (4,), [("0", "1"), ("0", "2")])  # one analysed round: no 3.85, 3.90, ...
    figures.append(full_figure(read_barriers(run_dir)))
    write_metrics(run_dir, 30, pooled=False)  # many rounds: a locator, still integers
    figures.append(accuracy_figure(read_metrics(run_dir)))
    for fig in figures:
        assert fig is not None
        axes = round_axes(fig)
        assert axes and all(integer_ticks(ax) for ax in axes), [ax.get_xticks() for ax in axes]


def test_full_barrier_shows_the_spread_over_pairs(run_dir: Path) -> None:
    fig = full_figure(read_barriers(run_dir))
    assert fig is not None
    texts = legend_texts(fig.axes[0])
    assert sorted(texts) == [
        "full model: mean over pairs; bars: min–max over pairs",
        "largest single layer (mean over pairs, bases)",
    ]
    assert "3 client–client pairs" in fig.axes[0].get_title()


def test_run_accuracy_shows_the_pooled_accuracy_in_percent(run_dir: Path) -> None:
    fig = accuracy_figure(read_metrics(run_dir))
    assert fig is not None
    ax = fig.axes[0]
    assert any(text.startswith("personalized, pooled") for text in legend_texts(ax))
    assert ax.get_ylabel() == "accuracy (%)" and ax.get_ylim() == (0, 100)


def test_heatmap_says_which_pairs_how_aggregated_and_what_the_sign_means(run_dir: Path) -> None:
    fig = run_heatmap_figure(read_barriers(run_dir), "run")
    assert fig is not None
    title = fig.get_suptitle()
    assert "mean over 3 client–client pairs and both bases (a, b)" in title and "α = ½" in title
    heatmap, colorbar = fig.axes
    assert "> 0: worse than the two models, < 0: better" in colorbar.get_ylabel()
    assert [t.get_text() for t in heatmap.get_yticklabels()] == BLOCKS
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["2", "4"]
    grid = heatmap.get_images()[0].get_array()
    # conv1: base a -0.02 and base b 0.0 -> mean -0.01; a cell is the mean over pairs and bases
    assert grid[0, 0] == pytest.approx(-0.01)
    low, high = heatmap.get_images()[0].get_clim()
    assert low == -high  # diverging scale centred at 0: the sign is the colour

    write_barriers(run_dir, (1,), [("0", "global"), ("1", "global")])
    title = run_heatmap_figure(read_barriers(run_dir)).get_suptitle()  # type: ignore[union-attr]
    assert "2 client–global pairs" in title


def test_compare_heatmaps_average_over_seeds_too(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_metrics(other, 4, pooled=True)
    write_barriers(other, (2, 4), [("0", "1")])
    fig = compare_heatmap_figure({"fedavg": [run_dir, other], "local": [other]})
    assert fig is not None
    assert "mean over seeds, 3 client–client pairs and both bases" in fig.get_suptitle()
    assert [ax.get_title() for ax in fig.axes[:2]] == ["fedavg", "local"]


def test_cumulative_names_the_block_added_at_k_and_shows_every_round(run_dir: Path) -> None:
    fig = cumulative_figure(read_barriers(run_dir))
    assert fig is not None
    shallow, random = fig.axes[:2]
    assert shallow.get_title() == "order: shallow"
    assert [t.get_text() for t in shallow.get_xticklabels()] == [f"{k}\n{b}" for k, b in enumerate(BLOCKS, 1)]
    assert len([line for line in shallow.lines if len(line.get_xdata()) == len(BLOCKS)]) == 2  # rounds 2, 4
    # the random order differs per round: its legend carries each round's sequence instead
    assert legend_texts(random) == ["round 2: fc1, fc2, conv1, conv2", "round 4: conv1, conv2, fc1, fc2"]
    assert legend_texts(shallow) == ["round 2", "round 4"]


def test_predicted_vs_measured_has_blocks_a_legend_and_a_labelled_identity(run_dir: Path) -> None:
    fig = predicted_figure(read_landscape(run_dir))
    assert fig is not None
    ax = fig.axes[0]
    texts = legend_texts(ax)
    assert "y = x (exact prediction)" in texts
    assert [t for t in texts if not t.startswith("y = x")] == [*BLOCKS, "all blocks (full model)"]
    identity = next(line for line in ax.lines if line.get_label() == "y = x (exact prediction)")
    assert np.array_equal(identity.get_xdata(), identity.get_ydata())
    colours = {tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert len(colours) == len(BLOCKS) + 1  # one colour per block
    assert "predicted" in ax.get_xlabel() and "measured" in ax.get_ylabel()


def test_prediction_table_scores_the_second_order_prediction_per_block(tmp_path: Path) -> None:
    predicted = [-0.05, -0.1, -0.2, -0.3, -0.4]
    rows = [  # fc1: measured = 2 x predicted, except round 3 (a miss); full model: the opposite sign
        {"round": r, "client_a": "0", "client_b": "1", "block": block, "predicted_barrier": p}
        | {"measured_barrier": m, "hessian_at": "midpoint"}
        for r, p in enumerate(predicted, start=1)
        for block, m in (("fc1", 2 * p - 0.5 * (r == 3)), ("*", -p))
    ]
    run = tmp_path / "run"
    write_metrics(run, 5, pooled=True)
    pd.DataFrame(rows, columns=LANDSCAPE_COLUMNS).to_csv(run / "landscape.csv", index=False)
    table = prediction_table(read_landscape(run)).set_index("block")
    fc1, full = table.loc["fc1"], table.loc["* (full model)"]
    assert fc1["points"] == 5 and fc1["spearman"] == pytest.approx(0.7)  # round 3 moves 2 ranks: 1 − 6·6/120
    assert 0.7 < fc1["pearson"] < 0.9 and fc1["ratio_median"] == pytest.approx(2.0)
    assert fc1["sign_agreement"] == 1.0 and fc1["worst_round"] == 3
    assert full["pearson"] == pytest.approx(-1.0) and full["spearman"] == pytest.approx(-1.0)
    assert full["sign_agreement"] == 0.0 and full["ratio_median"] == pytest.approx(-1.0)
    render(run)  # `fedlayer report RUN` writes the table beside barrier_predicted.png
    assert (run / "prediction.md").read_text().count("\n| ") == 3  # the header row and two blocks
    assert "fc1 | 5 |" in (run / "prediction.md").read_text()


def test_compare_accuracy_says_what_the_band_is(run_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_metrics(other, 4, pooled=False, offset=0.1)
    fig = accuracy_bands_figure({"fedper": [run_dir, other]})
    mean_panel = fig.axes[0]
    assert legend_texts(mean_panel) == ["fedper", "band: min–max over seeds"]
    assert "mean over 2 seeds" in fig.get_suptitle()
    band = mean_panel.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(60.0) and band[:, 1].max() == pytest.approx(80.0)


def test_partition_plot_names_the_classes(tmp_path: Path) -> None:
    report = {"num_clients": 3, "partitioner": "iid", "num_classes": 10}
    report["clients"] = [{"partition_id": i, "class_counts": [i + 1] * 10} for i in range(3)]
    legend = partition_figure(report, FMNIST).axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == FMNIST
    recorded = partition_figure(report | {"class_names": FMNIST})  # as partition.json records them
    assert legend_texts(recorded.axes[0]) == FMNIST
    assert legend_texts(partition_figure(report).axes[0]) == [str(c) for c in range(10)]

    (tmp_path / "config.resolved.toml").write_text('[data]\ndataset = "fashion_mnist"\n')
    assert list(known_class_names(tmp_path)) == FMNIST  # runs from before partition.json had the names


def write_compare(out: Path) -> dict[str, list[float]]:
    """A compare directory by hand: fedper with the pooled accuracy, an older fedavg run without it."""
    pooled = {}
    entries = []
    for strategy, seed in product(("fedper", "fedavg"), (0, 1)):
        run = out / "runs" / f"{strategy}-seed{seed}"
        # 4 rounds of 15 s (seed 0) or 30 s (seed 1): 1 and 2 minutes of round time, whatever summary.json
        # says (a resumed run's summary counts its last part only)
        seconds = 15.0 * (seed + 1)
        pooled[run.name] = write_metrics(
            run, 4, pooled=strategy == "fedper", offset=0.02 * seed, seconds=seconds
        )
        (run / "summary.json").write_text(json.dumps({"status": "finished", "seconds": 5.0}))
        (run / "config.resolved.toml").write_text("seed = 0\n")
        entries.append({"strategy": strategy, "seed": seed, "path": f"runs/{run.name}"})
    write_barriers(out / "runs" / "fedper-seed0", (2,), [("0", "1")])
    sweep = {"config": "x.toml", "seeds": [0, 1], "overrides": [], "runs": entries}
    (out / "sweep.json").write_text(json.dumps(sweep))
    return pooled


def test_table_has_pooled_accuracy_best_round_and_minutes(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    pooled = write_compare(out)
    render(out)
    table = pd.read_csv(out / "table.csv").set_index("strategy")
    assert list(table.index) == ["fedper", "fedavg"] and table["seeds"].tolist() == [2, 2]
    fedper = table.loc["fedper"]
    final = [pooled["fedper-seed0"][-1], pooled["fedper-seed1"][-1]]
    assert fedper["final_personalized_acc_pooled"] == pytest.approx(np.mean(final), abs=1e-6)
    assert fedper["final_personalized_acc_pooled_std"] == pytest.approx(np.std(final, ddof=1), abs=1e-6)
    assert fedper["best_personalized_acc_pooled"] == pytest.approx(np.mean(final), abs=1e-6)
    assert fedper["best_round"] == 2 and fedper["best_round_pooled"] == 4  # the mean peaks, pooled climbs
    assert fedper["minutes_per_run"] == pytest.approx(1.5) and fedper["seconds_per_round"] == 22.5
    assert fedper["bytes_per_round"] == 3_000_000
    assert fedper["final_full_barrier"] == pytest.approx(0.4)  # one run analysed: mean over that seed only
    assert np.isnan(table.loc["fedavg", "final_personalized_acc_pooled"])  # older runs: no pooled accuracy

    md = (out / "table.md").read_text().splitlines()
    header = [cell.strip() for cell in md[0].strip("|").split("|")]
    assert header[:6] == [
        "strategy",
        "seeds",
        "final acc (%)",
        "final pooled (%)",
        "best acc (%)",
        "best pooled (%)",
    ]
    assert {"best round", "min/run", "MB/round"} <= set(header)
    fedavg = dict(zip(header, (cell.strip() for cell in md[3].strip("|").split("|")), strict=True))
    assert fedavg["final pooled (%)"] == "–" and fedavg["best round"] == "2 ± 0"
    assert fedavg["final acc (%)"] == "61.00 ± 1.41"  # percent, two decimals, as papers print them
    assert fedavg["min/run"] == "1.5 ± 0.7" and fedavg["MB/round"] == "3.00 ± 0.00"
    report = (out / "report.md").read_text()
    assert "`final_personalized_acc_pooled` in table.csv" in report and "Σ correct / Σ test samples" in report
    for name in ("accuracy.png", "barrier_heatmaps.png", "runs/fedper-seed0/accuracy.png"):
        assert (out / name).exists(), name


def test_a_single_seed_shows_no_spread(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    write_compare(out)
    table = summary_table({"fedper": [out / "runs" / "fedper-seed0"]})
    assert np.isnan(table.loc[0, "final_personalized_acc_std"])
    assert "±" not in table_markdown(table).splitlines()[2]


def test_readers_keep_text_cells_and_read_missing_files_as_empty(run_dir: Path, tmp_path: Path) -> None:
    write_barriers(run_dir, (1,), [("0", "global")])
    barriers = read_barriers(run_dir)
    assert set(barriers["client_b"]) == {"global"} and set(
        barriers.loc[barriers["kind"] == "full", "base"]
    ) == {""}
    assert read_barriers(tmp_path).empty and read_metrics(tmp_path).empty and read_landscape(tmp_path).empty


def report_lines(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["report", str(path)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_cut_off_last_row_is_skipped_with_a_warning_naming_file_and_line(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a crash or a full disk leaves: the last row without its end."""
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 5, "global_a')
    code, err = report_lines(run_dir, capsys)
    assert code == 0
    cut = f"{metrics}: line 5 is cut off (a crash or a full disk while it was written); skipped"
    assert err == [f"fedlayer: warning: {cut}"]
    assert read_metrics(run_dir)["round"].tolist() == [1, 2, 3, 4]


def test_a_damaged_row_in_the_middle_is_one_line_naming_file_and_line(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join([*lines[:2], '{"round": 3, "glo\n', *lines[3:]]))
    code, err = report_lines(run_dir, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"fedlayer: error: {metrics}: line 3 is not a JSON row (")


def test_an_empty_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    code, err = report_lines(tmp_path, capsys)
    assert code == 0
    assert err == [
        f"fedlayer: warning: {tmp_path / 'metrics.jsonl'} has no rows: no round of {tmp_path} completed"
    ]


def test_a_damaged_summary_of_a_compare_run_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    write_compare(out)
    summary = out / "runs" / "fedavg-seed1" / "summary.json"
    summary.write_text('{"status": "fini')
    with pytest.raises(RunFileError) as err:
        SweepRun(Variant.parse("fedavg"), 1, summary.parent).finished()
    assert str(err.value).startswith(f"{summary}: not a JSON file (")


def test_accuracy_figure_draws_the_evaluated_rounds_only() -> None:
    """federation.evaluate_every = 2: rounds 1 and 3 have no accuracies; the curves join rounds 2 and 4."""
    rows = [{"round": r, "train_loss": 1.0} for r in (1, 3)]
    rows += [{"round": r, "global_acc": 0.5, "personalized_acc": 0.6} for r in (2, 4)]
    fig = accuracy_figure(pd.DataFrame(rows).sort_values("round"))
    assert fig is not None
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 and all(list(line.get_xdata()) == [2, 4] for line in lines)
