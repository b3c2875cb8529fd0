"""Landscape metrics: norms, cosines, curvature by Hessian-vector product, second-order barrier prediction."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from fedlayer.analysis import (
    EvalData,
    Evaluator,
    barrier_analysis,
    directional_curvature,
    landscape,
    layer_barriers,
    midpoint_barriers,
)
from fedlayer.models import model_blocks


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class Parallel(nn.Module):
    """Output linear in all parameters jointly: a squared error loss is an exact quadratic."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Linear(5, 2), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.left(x) + self.right(x)


class NormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, affine=False)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def squared_error_sum(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs - targets).pow(2).sum()


def states(model: nn.Module, scale: float, seed: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    torch.manual_seed(seed)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v + scale * torch.randn_like(v) if v.is_floating_point() else v for k, v in a.items()}
    return a, b


def classification(n: int = 30, seed: int = 0) -> EvalData:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return EvalData(x, torch.randint(0, 3, (n,), generator=generator))


def exact(model: nn.Module, data: EvalData, **kwargs: Any) -> Evaluator:
    return Evaluator(model, data, exact=True, batch_size=16, **kwargs)


def test_directional_curvature_is_the_hessian_quadratic_form() -> None:
    torch.manual_seed(0)
    model = MLP().double()
    data = classification()
    evaluator = exact(model, data)
    a, b = states(model, 0.5, seed=1)
    keys = ["fc1.weight", "fc1.bias"]
    shapes = [a[k].shape for k in keys]
    sizes = [a[k].numel() for k in keys]

    def loss(flat: Tensor) -> Tensor:
        parts = {k: p.view(s) for k, p, s in zip(keys, flat.split(sizes), shapes, strict=True)}
        return evaluator.loss_fn(torch.func.functional_call(model, {**a, **parts}, (data.x,)), data.y) / len(
            data
        )

    flat = torch.cat([a[k].flatten() for k in keys])
    v = torch.cat([(b[k] - a[k]).flatten() for k in keys])
    expected = v @ torch.autograd.functional.hessian(loss, flat) @ v
    direction = {k: b[k] - a[k] for k in keys}
    measured = directional_curvature(evaluator, a, direction, data, batch_size=7)
    assert measured.item() == pytest.approx(expected.item(), rel=1e-9)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), hessian_at=st.sampled_from(["midpoint", "a", "b"]))
def test_prediction_equals_measured_barrier_for_a_quadratic_loss(seed: int, hessian_at: str) -> None:
    torch.manual_seed(seed)
    model = Parallel().double()
    a, b = states(model, 1.0, seed)
    data = EvalData(torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64))
    evaluator = exact(model, data, loss_fn=squared_error_sum, correct_fn=None)
    blocks = model_blocks(model)
    rows = barrier_analysis(evaluator, a, b, blocks, alphas=(0.0, 0.5, 1.0))
    measured = {**midpoint_barriers(rows, base="b"), "*": midpoint_barriers(rows, kind="full", base="")[""]}
    result = landscape(evaluator, a, b, blocks, hessian_at=hessian_at, samples=None, measured=measured)
    assert [row.block for row in result] == ["left", "right", "*"]
    for row in result:
        assert row.predicted_barrier == pytest.approx(row.measured_barrier, rel=1e-9)
        assert row.predicted_barrier < 0  # convex: the midpoint is below the chord


def relative_errors(evaluator: Evaluator, model: nn.Module, scale: float, base: str) -> list[float]:
    blocks = model_blocks(model)
    a, b = states(model, scale, seed=3)
    measured = midpoint_barriers(layer_barriers(evaluator, a, b, blocks, alphas=(0, 0.5, 1)), base=base)
    rows = landscape(evaluator, a, b, blocks, hessian_at=base, samples=None, measured=measured)
    return [abs(row.predicted_barrier / row.measured_barrier - 1) for row in rows if row.block != "*"]


@pytest.mark.parametrize("base", ["a", "b"])
def test_prediction_is_second_order_accurate_for_small_steps(base: str) -> None:
    torch.manual_seed(0)
    model = MLP().double()
    evaluator = exact(model, classification(60))
    coarse, fine = (relative_errors(evaluator, model, scale, base) for scale in (0.05, 0.025))
    assert max(fine) < 0.01
    # the relative error is O(‖Δ‖²): halving the step shrinks it about fourfold
    assert all(f < c / 2.5 for f, c in zip(fine, coarse, strict=True)), (coarse, fine)


def test_norms_and_cosines() -> None:
    torch.manual_seed(0)
    model = MLP().double()
    data = classification()
    origin, a = states(model, 1.0, seed=4)
    _, b = states(model, 1.0, seed=5)
    blocks = model_blocks(model)
    rows = {row.block: row for row in landscape(exact(model, data), a, b, blocks, origin=origin)}
    for block, keys in blocks.items():
        delta = torch.cat([(b[k] - a[k]).flatten() for k in keys])
        from_a = torch.cat([(a[k] - origin[k]).flatten() for k in keys])
        from_b = torch.cat([(b[k] - origin[k]).flatten() for k in keys])
        assert rows[block].delta_norm == pytest.approx(delta.norm().item(), rel=1e-12)
        cosine = torch.nn.functional.cosine_similarity(from_a, from_b, dim=0).item()
        assert rows[block].cosine == pytest.approx(cosine, rel=1e-9)
    assert rows["*"].delta_norm ** 2 == pytest.approx(
        rows["fc1"].delta_norm ** 2 + rows["fc2"].delta_norm ** 2
    )
    assert all(math.isnan(row.cosine) for row in landscape(exact(model, data), a, b, blocks))


def test_buffers_stay_out_of_the_direction_and_bn_reset_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = NormCNN()
    a, b = states(model, 0.3, seed=6)
    data = EvalData(torch.randn(24, 1, 6, 6), torch.randint(0, 2, (24,)))
    blocks = model_blocks(model)
    calls: list[int] = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or tolist(self))
    rows = landscape(exact(model, data, bn="reset"), a, b, blocks, hessian_at="a", samples=16)
    assert calls == [1]
    assert [row.block for row in rows] == ["conv", "fc", "*"]  # bn has buffers only
    expected = sum((b[k] - a[k]).pow(2).sum() for k in ("conv.weight", "conv.bias", "fc.weight", "fc.bias"))
    assert rows[-1].delta_norm == pytest.approx(float(expected) ** 0.5, rel=1e-5)
    assert all(math.isfinite(row.curvature) for row in rows)
    assert rows[0].as_dict()["hessian_at"] == "a"
    with pytest.raises(ValueError, match="hessian_at: 'end' is not one of midpoint, a, b"):
        landscape(exact(model, data), a, b, blocks, hessian_at="end")
