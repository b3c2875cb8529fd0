"""The per-round analysis hook: pairs, rows written, failures contained, Ray actor, real simulation."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlayer.config import AnalysisConfig, load_config
from fedlayer.contract import GLOBAL
from fedlayer.experiment import federated_data, initial_model
from fedlayer.server.hook import AnalysisHook, is_analysis_round, pairs_of

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data_root: Path, *overrides: str):  # type: ignore[no-untyped-def]
    base = [
        f"data.root='{data_root}'",
        "data.min_partition_size=5",
        "federation.clients=3",
        "analysis.every=1",
        "analysis.max_clients=3",
        "analysis.samples=100",
    ]
    return load_config(ROOT / "experiments" / "default.toml", base + list(overrides))


def perturbed(state: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_pairs_cover_clients_and_global() -> None:
    cfg = AnalysisConfig(every=1, pairs="both", max_clients=3)
    assert pairs_of(cfg, [5, 1, 3, 9]) == [(1, 3), (1, 5), (3, 5), (1, GLOBAL), (3, GLOBAL), (5, GLOBAL)]
    assert pairs_of(AnalysisConfig(pairs="global", max_clients=2), [2, 0]) == [(0, GLOBAL), (2, GLOBAL)]
    assert [r for r in range(1, 7) if is_analysis_round(AnalysisConfig(every=3), r)] == [3, 6]
    assert not is_analysis_round(AnalysisConfig(every=0), 3)


def test_default_max_clients_is_up_to_three_of_the_sampled() -> None:
    default = AnalysisConfig(every=1)
    assert pairs_of(default, [7, 1]) == [(1, 7)]
    assert pairs_of(default, list(range(10))) == [(0, 1), (0, 2), (1, 2)]  # the first 3: 3 pairs


def test_rows_for_every_block_and_base_and_zero_for_identical_models(
    tiny_fmnist: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(tiny_fmnist, "analysis.pairs='clients'", "analysis.landscape=true")
    model = initial_model(cfg, federated_data(cfg).test)
    state = model.state_dict()
    hook = AnalysisHook(cfg, tmp_path, use_ray=False)
    hook.submit(
        1, {0: state, 1: {k: v.clone() for k, v in state.items()}, 2: perturbed(state, 0.05, 1)}, state
    )
    hook.finish()
    rows = read_csv(tmp_path / "barriers.csv")
    identical = [r for r in rows if (r["client_a"], r["client_b"]) == ("0", "1")]
    layer = [r for r in identical if r["kind"] == "layer"]
    assert {(r["block"], r["base"]) for r in layer} == {
        (b, s) for b in ("conv1", "conv2", "fc1", "fc2") for s in ("a", "b")
    }
    assert all(abs(float(r["barrier"])) < 1e-6 for r in identical)
    assert {(r["client_a"], r["client_b"]) for r in rows} == {("0", "1"), ("0", "2"), ("1", "2")}
    assert any(abs(float(r["barrier"])) > 1e-4 for r in rows if r["client_b"] == "2" and r["kind"] == "full")
    landscape = read_csv(tmp_path / "landscape.csv")
    assert {r["block"] for r in landscape} >= {"conv1", "fc2", "*"}
    assert (tmp_path / "barrier_heatmap.png").exists() and (tmp_path / "barrier_full.png").exists()


class Broken:
    def analyze(self, *args: object) -> None:
        raise RuntimeError("boom")


def test_a_failing_analysis_is_logged_not_fatal_unless_strict(tiny_fmnist: Path, tmp_path: Path) -> None:
    for strict in (False, True):
        out = tmp_path / str(strict)
        out.mkdir()
        hook = AnalysisHook(
            tiny_config(tiny_fmnist, f"analysis.strict={str(strict).lower()}"), out, use_ray=False
        )
        hook.worker = Broken()
        if strict:
            with pytest.raises(RuntimeError, match="analysis.strict"):
                hook.submit(1, {}, {})
        else:
            hook.submit(1, {}, {})
            assert hook.failures == 1
        assert "boom" in (out / "analysis_errors.log").read_text()


@pytest.mark.slow
def test_ray_actor_returns_before_the_work_is_done(tiny_fmnist: Path, tmp_path: Path) -> None:
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        cfg = tiny_config(tiny_fmnist, "analysis.cumulative=['shallow','deep','random','minimal']")
        state = initial_model(cfg, federated_data(cfg).test).state_dict()
        hook = AnalysisHook(cfg, tmp_path)
        hook.submit(1, {0: state, 1: perturbed(state, 0.05, 1)}, state)
        assert len(hook.pending) == 1  # submit returned while the actor was still computing
        hook.finish()
        assert not hook.pending
        kinds = {r["kind"] for r in read_csv(tmp_path / "barriers.csv")}
        assert kinds == {"layer", "full", "cumulative"}
    finally:
        ray.shutdown()


def run_fedper(data_root: Path, out: Path, *overrides: str, **env: str) -> None:
    """A real 3-client fedper simulation with the hook on, through the CLI in a subprocess."""
    args = [sys.executable, "-m", "fedlayer.cli", "run", "experiments/default.toml", "--out", str(out)]
    for item in (
        f"data.root='{data_root}'",
        "data.min_partition_size=5",
        "federation.clients=3",
        "strategy.name='fedper'",
        "analysis.max_clients=3",
        "analysis.samples=100",
        *overrides,
    ):
        args += ["--set", item]
    environ = os.environ | {"FLWR_TELEMETRY_ENABLED": "0"} | env
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=420, env=environ)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_hook_rows_for_every_round_pair_block_and_base(tiny_fmnist: Path, tmp_path: Path) -> None:
    """3 rounds, hook every round; the analysis of round 2 fails (client 0 sends a malformed personal
    layer, which only the analysis uses); the run still succeeds."""
    out = tmp_path / "run"
    run_fedper(
        tiny_fmnist,
        out,
        "federation.rounds=3",
        "analysis.every=1",
        "analysis.pairs='both'",
        "federation.client_app='tests.fault_injection:app'",
        FEDLAYER_TEST_FAULT="personal-shape:0:2",
    )
    rows = read_csv(out / "barriers.csv")
    pairs = {("0", "1"), ("0", "2"), ("1", "2"), ("0", GLOBAL), ("1", GLOBAL), ("2", GLOBAL)}
    blocks = {"conv1", "conv2", "fc1", "fc2"}
    for server_round in ("1", "3"):
        layer = {
            (r["client_a"], r["client_b"], r["block"], r["base"])
            for r in rows
            if r["round"] == server_round and r["kind"] == "layer"
        }
        assert layer == {(a, b, block, base) for a, b in pairs for block in blocks for base in ("a", "b")}
    assert not [r for r in rows if r["round"] == "2"]
    errors = (out / "analysis_errors.log").read_text()
    assert errors.startswith("round 2:") and "round 1:" not in errors and "round 3:" not in errors
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3
    assert (out / "barrier_heatmap.png").exists()


@pytest.mark.slow
def test_full_models_travel_only_on_analysis_rounds(tiny_fmnist: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_fedper(tiny_fmnist, out, "federation.rounds=2", "analysis.every=2")
    assert {r["round"] for r in read_csv(out / "barriers.csv")} == {"2"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # fedper keeps the head personal; only the analysis round brings full models back.
    assert metrics[1]["bytes_up"] > metrics[0]["bytes_up"]


def test_each_model_is_evaluated_once_per_round_not_once_per_pair(tiny_fmnist: Path) -> None:
    """The endpoints of 3 client-client pairs are 3 models: 3 evaluations, and the rows equal the
    per-pair analysis that evaluates both endpoints of every pair itself."""
    from fedlayer.analysis.barriers import barrier_analysis
    from fedlayer.server.hook import BarrierWorker

    cfg = tiny_config(tiny_fmnist, "analysis.pairs='clients'")
    worker = BarrierWorker(cfg)
    state = worker.model.state_dict()
    models: dict[int | str, dict[str, torch.Tensor]] = {i: perturbed(state, 0.05, i) for i in range(3)}
    evaluated = []
    original = worker.evaluator.evaluate_tensor
    worker.evaluator.evaluate_tensor = lambda s: evaluated.append(1) or original(s)  # type: ignore[method-assign]
    rows, _ = worker.analyze(1, models, state)
    per_pair = 1 + 2 * len(worker.blocks)  # the full path and every block on both bases
    assert len(evaluated) == 3 + 3 * per_pair
    for a, b in ((0, 1), (0, 2), (1, 2)):
        alone = barrier_analysis(worker.evaluator, models[a], models[b], worker.blocks, seed=cfg.seed + 1)
        mine = [r for r in rows if (r["client_a"], r["client_b"]) == (a, b)]
        pair_keys = ("round", "client_a", "client_b")
        ours = [{k: v for k, v in r.items() if k not in pair_keys} for r in mine]
        assert json.dumps(ours) == json.dumps([row.as_dict() for row in alone])  # NaN-aware equality
