"""Barrier library: the identities of `fedlayer.analysis.barriers` in exact fp32 (float64 where stated)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from fedlayer.analysis import (
    ORDERS,
    BarrierRow,
    EvalData,
    Evaluator,
    barrier_analysis,
    check_blocks,
    cumulative_barriers,
    cumulative_order,
    evaluate_endpoints,
    full_barrier,
    interpolate,
    layer_barriers,
    random_direction,
    random_direction_control,
)
from fedlayer.models import model_blocks

GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
FAST = settings(max_examples=15, deadline=None)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Parallel(nn.Module):
    """Output linear in all parameters jointly: a squared error loss is an exact quadratic."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(5, 2), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.left(x) + self.right(x)


def squared_error_sum(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs - targets).pow(2).sum()


def trained_state(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """A state with seed-dependent weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.reset_parameters()
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        model.train()
        with torch.no_grad():
            model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
        model.eval()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cnn_data() -> EvalData:
    generator = torch.Generator().manual_seed(0)
    return EvalData(
        torch.randn(48, 1, 8, 8, generator=generator), torch.randint(0, 3, (48,), generator=generator)
    )


@pytest.fixture(scope="module")
def cnn() -> tuple[SmallCNN, dict[str, Tensor], dict[str, Tensor]]:
    model = SmallCNN()
    return model, trained_state(model, 1), trained_state(model, 2)


def exact(model: nn.Module, data: EvalData, **kwargs: Any) -> Evaluator:
    return Evaluator(model, data, exact=True, batch_size=16, **kwargs)


def by_path(rows: list[BarrierRow]) -> dict[tuple[str, str, float], BarrierRow]:
    return {(row.base, row.block, row.alpha): row for row in rows}


def test_model_blocks_group_tensors_by_owning_module() -> None:
    blocks = model_blocks(SmallCNN())
    assert list(blocks) == ["conv1", "bn1", "conv2", "bn2", "fc"]
    assert blocks["bn1"] == [
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
    ]
    keys = SmallCNN().state_dict().keys()
    check_blocks(blocks, keys)
    with pytest.raises(ValueError, match=r"in several: \['fc.bias'\]"):
        check_blocks({**blocks, "extra": ["fc.bias"]}, keys)
    with pytest.raises(ValueError, match=r"in none: \['fc.bias', 'fc.weight'\]"):
        check_blocks({k: v for k, v in blocks.items() if k != "fc"}, keys)


def test_interpolate_takes_int_buffers_and_other_blocks_from_base(cnn: tuple) -> None:
    _, a, b = cnn
    b = {**b, "bn1.num_batches_tracked": torch.tensor(7)}
    keys = set(model_blocks(SmallCNN())["bn1"])
    mid = interpolate(a, b, 0.5, keys, b)
    assert torch.equal(mid["bn1.running_mean"], torch.lerp(a["bn1.running_mean"], b["bn1.running_mean"], 0.5))
    assert mid["bn1.num_batches_tracked"] is b["bn1.num_batches_tracked"]
    assert mid["conv1.weight"] is b["conv1.weight"]
    assert all(
        torch.equal(interpolate(a, b, 0.0, keys, a)[k], a[k]) for k in keys - {"bn1.num_batches_tracked"}
    )
    assert all(
        torch.equal(interpolate(a, b, 1.0, keys, a)[k], b[k]) for k in keys - {"bn1.num_batches_tracked"}
    )


def test_evaluate_matches_a_plain_loop(cnn: tuple, cnn_data: EvalData) -> None:
    model, a, _ = cnn
    model.load_state_dict(a)
    with torch.no_grad():
        logits = model.eval()(cnn_data.x)
    loss, error = exact(model, cnn_data).evaluate(a)
    assert loss == pytest.approx(F.cross_entropy(logits, cnn_data.y).item(), rel=1e-6)
    assert error == pytest.approx(1 - (logits.argmax(1) == cnn_data.y).double().mean().item(), abs=1e-12)


def count_host_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self: Tensor, *args: Any, _name: str = name, _original: Any = original) -> Any:
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("bn", ["interpolate", "reset"])
def test_one_host_sync_per_evaluation_and_per_analysis(
    cnn: tuple, cnn_data: EvalData, bn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, a, b = cnn
    evaluator = exact(model, cnn_data, bn=bn)
    blocks = model_blocks(model)
    calls = count_host_syncs(monkeypatch)
    evaluator.evaluate(a)
    assert calls == ["tolist"]
    layer_barriers(evaluator, a, b, blocks, alphas=GRID)
    assert len(calls) == 2  # endpoints and every block's path points: one sync in all


def test_self_barrier_is_zero(cnn: tuple, cnn_data: EvalData) -> None:
    model, a, _ = cnn
    evaluator = exact(model, cnn_data)
    blocks = model_blocks(model)
    rows = barrier_analysis(evaluator, a, a, blocks, alphas=GRID, cumulative=ORDERS)
    columns = ("barrier", "error_barrier", "path_barrier", "path_error_barrier", "barrier_path_max")
    assert {getattr(row, column) for row in rows for column in columns} == {0.0}


@FAST
@given(seed=st.integers(0, 2**16), bn=st.sampled_from(["interpolate", "reset"]))
def test_self_barrier_is_zero_for_any_model(seed: int, bn: str) -> None:
    model = MLP() if bn == "interpolate" else SmallCNN()
    shape = (20, 6) if bn == "interpolate" else (20, 1, 8, 8)
    data = EvalData(torch.randn(shape), torch.randint(0, 3, (20,)))
    state = trained_state(model, seed)
    rows = layer_barriers(exact(model, data, bn=bn), state, state, model_blocks(model))
    assert {row.barrier for row in rows} == {0.0}


@pytest.mark.parametrize("bn", ["interpolate", "reset"])
def test_barrier_of_a_block_equal_in_both_models_is_zero(cnn: tuple, cnn_data: EvalData, bn: str) -> None:
    model, a, b = cnn
    blocks = model_blocks(model)
    b = {**b, **{key: a[key] for key in blocks["conv2"]}}
    rows = layer_barriers(exact(model, cnn_data, bn=bn), a, b, blocks, alphas=GRID)
    equal = [row for row in rows if row.block == "conv2"]
    assert {row.path_barrier for row in equal} == {0.0}
    assert {row.path_error_barrier for row in equal} == {0.0}
    # normalized by the full endpoints, the two bases cancel: B^a = ½(L_A − L_B) = −B^b
    paths = by_path(rows)
    assert paths["a", "conv2", 0.5].barrier + paths["b", "conv2", 0.5].barrier == pytest.approx(0, abs=1e-12)
    assert any(row.path_barrier != 0 for row in rows if row.block != "conv2")


def test_alpha_zero_and_one_reproduce_the_endpoints(cnn: tuple, cnn_data: EvalData) -> None:
    model, a, b = cnn
    evaluator = exact(model, cnn_data, bn="reset")
    blocks = model_blocks(model)
    keys = evaluator.keys
    ends = evaluate_endpoints(evaluator, a, b)
    for base in (a, b):
        assert evaluator.evaluate(interpolate(a, b, 0.0, keys, base)) == (ends.loss_a, ends.error_a)
        assert evaluator.evaluate(interpolate(a, b, 1.0, keys, base)) == (ends.loss_b, ends.error_b)
    # a single-block path starts/ends at the base with that block from A/B, evaluated afresh
    paths = by_path(layer_barriers(evaluator, a, b, blocks, alphas=GRID))
    swapped = {**b, **{key: a[key] for key in blocks["bn1"]}}
    assert paths["b", "bn1", 0.0].loss == evaluator.evaluate(swapped)[0]
    assert paths["b", "bn1", 0.0].path_loss_0 == paths["b", "bn1", 0.0].loss
    assert paths["a", "fc", 0.0].loss == ends.loss_a
    assert paths["b", "fc", 1.0].loss == ends.loss_b


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("bn", ["interpolate", "reset"])
def test_cumulative_barrier_with_all_blocks_is_the_full_barrier(
    cnn: tuple, cnn_data: EvalData, order: str, bn: str
) -> None:
    model, a, b = cnn
    evaluator = exact(model, cnn_data, bn=bn)
    blocks = model_blocks(model)
    ends = evaluate_endpoints(evaluator, a, b)
    full = {row.alpha: row for row in full_barrier(evaluator, a, b, blocks, alphas=GRID, endpoints=ends)}
    rows = cumulative_barriers(evaluator, a, b, blocks, order, seed=3, alphas=GRID, endpoints=ends)
    assert [row.k for row in rows if row.alpha == 0.5] == [1, 2, 3, 4, 5] * 2
    last = [row for row in rows if row.k == len(blocks)]
    assert len(last) == 2 * len(GRID)
    for row in last:
        assert (row.loss, row.barrier, row.error_barrier, row.barrier_path_max) == (
            full[row.alpha].loss,
            full[row.alpha].barrier,
            full[row.alpha].error_barrier,
            full[row.alpha].barrier_path_max,
        )
    assert full[0.5].barrier != 0


def test_cumulative_orders() -> None:
    names = [str(i) for i in range(12)]
    assert cumulative_order(names, "deep") == names[::-1]
    assert cumulative_order(names, "minimal") == [str(i) for i in (0, 11, 1, 10, 2, 9, 3, 8, 4, 7, 5, 6)]
    assert cumulative_order(["x", "y", "z"], "minimal") == ["x", "z", "y"]
    assert cumulative_order(names, "random", seed=1) == cumulative_order(names, "random", seed=1)
    assert cumulative_order(names, "random", seed=1) != cumulative_order(names, "random", seed=2)
    with pytest.raises(ValueError, match="analysis.cumulative: 'middle' is not one of shallow"):
        cumulative_order(names, "middle")


@given(n=st.integers(0, 30), order=st.sampled_from(ORDERS), seed=st.integers(0, 100))
def test_every_cumulative_order_is_a_permutation(n: int, order: str, seed: int) -> None:
    names = [f"b{i}" for i in range(n)]
    assert sorted(cumulative_order(names, order, seed)) == sorted(names)


def quadratic_setup(seed: int) -> tuple[Parallel, EvalData, dict[str, Tensor], dict[str, Tensor]]:
    torch.manual_seed(seed)
    model = Parallel().double()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v + torch.randn_like(v) for k, v in a.items()}
    data = EvalData(torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64))
    return model, data, a, b


@FAST
@given(seed=st.integers(0, 2**16))
def test_quadratic_loss_midpoint_barrier_is_minus_an_eighth_of_the_curvature(seed: int) -> None:
    model, data, a, b = quadratic_setup(seed)
    evaluator = exact(model, data, loss_fn=squared_error_sum, correct_fn=None)
    blocks = model_blocks(model)
    # L = mean ‖f_θ(x) − y‖², f linear in θ: ΔᵀHΔ = 2·mean ‖f_Δ(x)‖² along any block's Δ
    deltas = {k: b[k] - a[k] for k in a}

    def curvature(blocks: tuple[str, ...]) -> float:
        out = sum(data.x @ deltas[f"{p}.weight"].T + deltas[f"{p}.bias"] for p in blocks)
        return 2 * torch.as_tensor(out).pow(2).sum(1).mean().item()

    rows = barrier_analysis(evaluator, a, b, blocks, alphas=(0.0, 0.5, 1.0))
    for row in rows:
        if row.alpha == 0.5:
            expected = -curvature((row.block,) if row.block else ("left", "right")) / 8
            assert row.path_barrier == pytest.approx(expected, rel=1e-9)
            assert math.isnan(row.error_barrier)
    full = next(row for row in rows if row.kind == "full" and row.alpha == 0.5)
    assert full.barrier == full.path_barrier


def test_random_direction_preserves_every_tensor_norm(cnn: tuple) -> None:
    model, a, b = cnn
    params = {name for name, _ in model.named_parameters()}
    directions = random_direction(a, b, params, seed=5)
    assert set(directions) == {k for k in params if a[k].numel() > 0}
    for key, r in directions.items():
        assert r.norm() == pytest.approx((b[key] - a[key]).norm().item(), rel=1e-5)
        cosine = F.cosine_similarity(r.flatten(), (b[key] - a[key]).flatten(), dim=0)
        assert abs(cosine) < 0.9
    again = random_direction(a, b, params, seed=5)
    assert all(torch.equal(again[k], directions[k]) for k in directions)
    for block, keys in model_blocks(model).items():
        norm = sum(directions[k].pow(2).sum() for k in keys if k in directions) ** 0.5
        real = sum((b[k] - a[k]).pow(2).sum() for k in keys if k in directions) ** 0.5
        assert float(norm) == pytest.approx(float(real), rel=1e-5), block


def test_random_control_rows(cnn: tuple, cnn_data: EvalData) -> None:
    model, a, b = cnn
    evaluator = exact(model, cnn_data)
    blocks = model_blocks(model)
    ends = evaluate_endpoints(evaluator, a, b)
    rows = random_direction_control(evaluator, a, b, blocks, alphas=GRID, seed=1)
    assert {row.kind for row in rows} == {"random"}
    assert {(row.endpoint_loss_a, row.endpoint_loss_b) for row in rows} == {(ends.loss_a, ends.loss_b)}
    real = by_path(layer_barriers(evaluator, a, b, blocks, alphas=GRID, endpoints=ends))
    for row in rows:
        same = real[row.base, row.block, row.alpha]
        assert row.barrier - same.barrier == pytest.approx(row.loss - same.loss, abs=1e-12)
        # Each base's path is anchored at its own endpoint: a -> a + r, b - r -> b.
        if (row.base, row.alpha) == ("a", 0.0):
            assert row.loss == ends.loss_a
        if (row.base, row.alpha) == ("b", 1.0):
            assert row.loss == ends.loss_b
        if (row.base, row.alpha) in {("a", 1.0), ("b", 0.0)}:
            assert row.loss not in (ends.loss_a, ends.loss_b)
    combined = [
        row for row in barrier_analysis(evaluator, a, b, blocks, alphas=GRID, random_control=True, seed=1)
    ]
    assert [row for row in combined if row.kind == "random"] == rows


def test_random_control_is_equal_norm_on_both_bases(cnn: tuple, cnn_data: EvalData) -> None:
    """At α = ½ the random point is its base endpoint with block l moved by r/2: θ_A + r/2 on base a,
    θ_B − r/2 on base b (‖r‖ = ‖Δ_l‖), so both bases are as far from their endpoint as the real midpoint."""
    model, a, b = cnn
    evaluator = exact(model, cnn_data)
    blocks = model_blocks(model)
    directions = random_direction(a, b, evaluator.parameter_keys, seed=1)
    rows = random_direction_control(evaluator, a, b, blocks, seed=1)
    for base, anchor, sign in (("a", a, 0.5), ("b", b, -0.5)):
        row = next(r for r in rows if r.base == base and r.block == "conv2")
        point = {k: v + sign * directions[k] if k.startswith("conv2.") else v for k, v in anchor.items()}
        ((loss, _),) = evaluator.evaluate_many([point])
        assert row.loss == pytest.approx(loss, abs=1e-6), base
        moved = sum((point[k] - anchor[k]).pow(2).sum() for k in blocks["conv2"]) ** 0.5
        half = sum((b[k] - a[k]).pow(2).sum() for k in blocks["conv2"]) ** 0.5 / 2
        assert float(moved) == pytest.approx(float(half), rel=1e-5)


def test_bn_reset_re_estimates_running_stats_on_the_data(cnn: tuple, cnn_data: EvalData) -> None:
    model, a, b = cnn
    mid = interpolate(a, b, 0.5, set(a), a)
    evaluator = Evaluator(model, cnn_data, exact=True, batch_size=len(cnn_data), bn="reset")
    fresh = evaluator.reestimate_bn(mid)
    h = F.conv2d(cnn_data.x, mid["conv1.weight"], mid["conv1.bias"], padding=1)
    torch.testing.assert_close(fresh["bn1.running_mean"], h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fresh["bn1.running_var"], h.var((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert int(fresh["bn1.num_batches_tracked"]) == 1
    assert torch.equal(mid["bn1.running_mean"], torch.lerp(a["bn1.running_mean"], b["bn1.running_mean"], 0.5))
    # several equal batches: the cumulative average of batch means is the data mean
    batched = Evaluator(model, cnn_data, exact=True, batch_size=16, bn="reset").reestimate_bn(mid)
    torch.testing.assert_close(batched["bn1.running_mean"], h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert int(batched["bn1.num_batches_tracked"]) == 3
    subset = Evaluator(model, cnn_data, exact=True, batch_size=64, bn="reset", bn_samples=8).reestimate_bn(
        mid
    )
    torch.testing.assert_close(subset["bn1.running_mean"], h[:8].mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert not model.training and not evaluator.model.training
    interpolated = exact(model, cnn_data).evaluate(mid)
    assert evaluator.evaluate(mid) != interpolated
    assert evaluator.evaluate(mid) == pytest.approx(exact(model, cnn_data).evaluate(fresh), rel=1e-6)


def test_rows_layout_and_as_dict(cnn: tuple, cnn_data: EvalData) -> None:
    model, a, b = cnn
    evaluator = exact(model, cnn_data)
    blocks = model_blocks(model)
    rows = layer_barriers(evaluator, a, b, blocks)
    assert [(row.base, row.block) for row in rows] == [(base, name) for base in "ab" for name in blocks]
    assert all(math.isnan(row.path_barrier) and math.isnan(row.barrier_path_max) for row in rows)
    row = rows[0].as_dict()
    assert {
        "kind",
        "order",
        "base",
        "block",
        "k",
        "alpha",
        "loss",
        "error",
        "barrier",
        "error_barrier",
    } <= set(row)
    assert row["barrier"] == pytest.approx(
        row["loss"] - (row["endpoint_loss_a"] + row["endpoint_loss_b"]) / 2
    )
    grid = layer_barriers(evaluator, a, b, blocks, alphas=(0.3, 0.6), bases=("b",))
    assert len(grid) == len(blocks) * 2
    for row_ in grid:
        assert row_.barrier_path_max == max(r.path_barrier for r in grid if r.block == row_.block)
        assert not math.isnan(row_.path_loss_0)


def test_invalid_arguments_name_the_field(cnn: tuple, cnn_data: EvalData) -> None:
    model, a, b = cnn
    evaluator = exact(model, cnn_data)
    blocks = model_blocks(model)
    with pytest.raises(ValueError, match="analysis.alphas"):
        layer_barriers(evaluator, a, b, blocks, alphas=(0.5, 1.5))
    with pytest.raises(ValueError, match="bases"):
        layer_barriers(evaluator, a, b, blocks, bases=("c",))
    with pytest.raises(ValueError, match="analysis.bn: 'none' is not one of interpolate, reset"):
        Evaluator(model, cnn_data, bn="none")
    with pytest.raises(KeyError, match=r"missing \['fc.bias'\]"):
        evaluator.evaluate({k: v for k, v in a.items() if k != "fc.bias"})


def test_state_dicts_and_template_are_left_untouched(cnn: tuple, cnn_data: EvalData) -> None:
    model, a, b = cnn
    copies = [{k: v.clone() for k, v in s.items()} for s in (a, b, model.state_dict())]
    barrier_analysis(exact(model, cnn_data, bn="reset"), a, b, model_blocks(model), random_control=True)
    for before, after in zip(copies, (a, b, model.state_dict()), strict=True):
        assert all(torch.equal(before[k], after[k]) for k in before)
