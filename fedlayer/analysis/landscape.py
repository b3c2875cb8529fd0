"""Landscaping metrics per block (Singh et al., "Landscaping linear mode connectivity").

For every block l with parameters, with Δ_l = θ_B^l − θ_A^l over the block's parameters (buffers such as
BatchNorm statistics never enter Δ):

- ``delta_norm`` = ‖Δ_l‖;
- ``cosine`` between the two models' displacements from a common origin θ_0 (the round's starting global
  model): cos(θ_A^l − θ_0^l, θ_B^l − θ_0^l);
- ``curvature`` = Δ_lᵀ H Δ_l, H the Hessian of the mean loss w.r.t. the block's parameters at the path
  midpoint, by a forward-over-reverse Hessian-vector product (``torch.func.jvp`` of ``torch.func.grad``)
  in true fp32, summed over batches of the first ``samples`` evaluation samples;
- ``predicted_barrier`` = −⅛·Δ_lᵀ H Δ_l, the second-order prediction of the midpoint barrier of the
  single-block path normalized by its own ends (``path_barrier`` at α = ½ in the barrier rows): with
  f(α) = L(path(α)), f(½) − ½[f(0) + f(1)] = −⅛ f''(½) − O(f''''), exact for a quadratic loss.

A row with block ``"*"`` does the same for all blocks at once (Δ = θ_B − θ_A, H at ½(θ_A + θ_B)), which
predicts the full barrier. With ``bn="reset"`` the point's BatchNorm statistics are re-estimated first and
then held constant while differentiating.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from fedlayer.analysis.barriers import Blocks, State, check_blocks, interpolate
from fedlayer.analysis.evaluate import EvalData, Evaluator, ieee_fp32

HESSIAN_POINTS = ("midpoint", "a", "b")
ALL_BLOCKS = "*"


@dataclass(frozen=True)
class LandscapeRow:
    """Landscape metrics of one block (``"*"``: all blocks); see the module docstring.

    ``cosine`` is NaN without an origin, ``measured_barrier`` NaN unless given; ``hessian_at`` is the
    point H is taken at: the full midpoint, or the single-block path midpoint on base a or b.
    """

    block: str
    delta_norm: float
    cosine: float
    curvature: float
    predicted_barrier: float
    measured_barrier: float
    hessian_at: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def directional_curvature(
    evaluator: Evaluator, state: State, direction: State, data: EvalData, batch_size: int = 256
) -> Tensor:
    """vᵀ H v of the evaluator's mean loss on ``data`` at ``state``, v = ``direction`` (keys: the parameters
    that move, all others fixed), as a 0-d float64 device tensor (no host sync). BatchNorm statistics in
    ``state`` are used as they are."""
    fixed = {key: value for key, value in state.items() if key not in direction}
    primal = {key: state[key] for key in direction}
    tangent = {key: value.to(state[key].dtype) for key, value in direction.items()}

    def loss(params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return evaluator.loss_fn(functional_call(evaluator.model, {**fixed, **params}, (xb,)), yb)

    total = torch.zeros((), dtype=torch.float64, device=evaluator.device)
    with ieee_fp32(evaluator.device), warnings.catch_warnings():
        # torch loads its forward-AD decompositions with torch.jit.script once and warns about it
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        for xb, yb in data.batches(batch_size):
            grad = functools.partial(torch.func.grad(loss), xb=xb, yb=yb)
            hvp = torch.func.jvp(grad, (primal,), (tangent,))[1]
            total += _dot(tangent, hvp)
    return total / len(data)


def _dot(x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Tensor:
    return torch.stack([(x[key].double() * y[key].double()).sum() for key in x]).sum()


def _difference(x: State, y: State, keys: Sequence[str]) -> dict[str, Tensor]:
    return {key: x[key] - y[key] for key in keys}


def _block_stats(
    evaluator: Evaluator,
    point: State,
    a: State,
    b: State,
    origin: State | None,
    keys: Sequence[str],
    data: EvalData,
) -> Tensor:
    """``[‖Δ‖, cosine, curvature]`` of one block on the device."""
    delta = _difference(b, a, keys)
    norm = _dot(delta, delta).sqrt()
    if origin is None:
        cosine = torch.full_like(norm, math.nan)
    else:
        from_a, from_b = _difference(a, origin, keys), _difference(b, origin, keys)
        cosine = _dot(from_a, from_b) / (_dot(from_a, from_a) * _dot(from_b, from_b)).sqrt()
    return torch.stack([norm, cosine, directional_curvature(evaluator, point, delta, data)])


def landscape(
    evaluator: Evaluator,
    sd_a: State,
    sd_b: State,
    blocks: Blocks,
    *,
    origin: State | None = None,
    hessian_at: str = "midpoint",
    samples: int | None = 512,
    measured: Mapping[str, float] | None = None,
) -> list[LandscapeRow]:
    """Landscape metrics of every block that has parameters, then of all blocks at once (``"*"``).

    Parameters
    ----------
    evaluator
        Supplies the model template, the loss, the data (its first ``samples``) and the BatchNorm mode.
    sd_a, sd_b
        State dicts of θ_A and θ_B.
    blocks
        Ordered block name -> state-dict keys, as for the barriers.
    origin
        θ_0 for the cosine of the displacements (the round's starting global model); None gives NaN.
    hessian_at
        ``midpoint``: H at ½(θ_A + θ_B) for every block; ``a`` / ``b``: H at the midpoint of the
        single-block path on that base (the exact second-order point for its ``path_barrier``).
    samples
        Leading evaluation samples for the Hessian-vector products (None: all).
    measured
        Block -> measured midpoint barrier to report beside the prediction (e.g. from
        :func:`fedlayer.analysis.barriers.midpoint_barriers`; ``"*"`` for the full barrier).

    Returns
    -------
    list[LandscapeRow]
        One row per block with parameters (shallow to deep), then the ``"*"`` row; one host sync.
    """
    if hessian_at not in HESSIAN_POINTS:
        raise ValueError(f"hessian_at: {hessian_at!r} is not one of {', '.join(HESSIAN_POINTS)}")
    check_blocks(blocks, evaluator.keys)
    a, b = evaluator.prepare(sd_a), evaluator.prepare(sd_b)
    start = evaluator.prepare(origin) if origin is not None else None
    params = {
        block: [key for key in keys if key in evaluator.parameter_keys and a[key].is_floating_point()]
        for block, keys in blocks.items()
    }
    groups = {block: keys for block, keys in params.items() if keys}
    groups[ALL_BLOCKS] = [key for keys in groups.values() for key in keys]
    midpoint = interpolate(a, b, 0.5, evaluator.keys, a)
    data = evaluator.data.head(samples)

    def point(block: str) -> State:
        if hessian_at == "midpoint" or block == ALL_BLOCKS:
            state = midpoint
        else:
            state = interpolate(a, b, 0.5, blocks[block], a if hessian_at == "a" else b)
        return evaluator.reestimate_bn(state) if evaluator.bn == "reset" else state

    stats = [_block_stats(evaluator, point(block), a, b, start, keys, data) for block, keys in groups.items()]
    values = torch.stack(stats).tolist()
    measured = measured or {}
    return [
        LandscapeRow(
            block=block,
            delta_norm=norm,
            cosine=cosine,
            curvature=curvature,
            predicted_barrier=-curvature / 8.0,
            measured_barrier=measured.get(block, math.nan),
            hessian_at=hessian_at,
        )
        for block, (norm, cosine, curvature) in zip(groups, values, strict=True)
    ]
