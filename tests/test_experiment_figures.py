"""The explanatory figure of the committed `lmc.toml` results draws from those results."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lmc_figure_shows_every_run_and_every_measured_block() -> None:
    lmc_figure = load("experiments/lmc_figure.py")
    fig = lmc_figure.figure()
    top, bottom = fig.axes[:4], fig.axes[4:]  # subplots(2, 4): row by row
    assert len(fig.axes) == 8
    # top: three fixed methods + lmc; bottom: four blocks + the threshold line
    assert all(len(ax.get_lines()) == 4 for ax in top)
    assert all(len(ax.get_lines()) == 5 for ax in bottom)
    # the classifier is measured once (round 5) and then personal; the convolutions at every decision round
    conv1, fc1 = bottom[0].get_lines()[0], bottom[0].get_lines()[2]
    assert list(conv1.get_xdata()) == [5, 10, 15, 20, 25, 30]
    assert list(fc1.get_xdata()) == [5]


def test_pfllib_comparison_judges_each_method_against_its_column() -> None:
    script = load("experiments/pfllib_comparison.py")
    frame = script.comparison().set_index("strategy")
    assert len(frame) >= 7 and (frame["rounds"] >= 50).all()  # issue 13: >= 50 rounds each
    published = script.PUBLISHED["dir0.1"]  # the committed runs are Dirichlet(0.1)
    for label, row in frame.iterrows():
        name = str(label).split("{")[0]
        if name not in published:
            assert row["met (within 0.5)"] == "–"
            continue
        assert row["PFLlib (%)"] == published[name]
        within = row["final pooled (%)"] >= published[name] - script.GOAL_POINTS
        expected = "–" if name in script.NOT_JUDGED else ("yes" if within else "no")
        assert row["met (within 0.5)"] == expected
    assert frame.loc["fedavg", "met (within 0.5)"] == "–" and frame.loc["fedper", "met (within 0.5)"] == "yes"
    committed = (ROOT / "experiments/results/pfllib_fmnist_full/pfllib.md").read_text()
    assert committed == script.markdown(script.comparison())  # the committed table is the script's output
