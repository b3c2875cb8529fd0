"""A client's cost of sharing each block: the layer-wise barrier toward the server's model, on its own data.

For a client model θ and the server's reference θ_ref (the round's incoming global blocks, and the server's
average of the personal ones), the cost of block l is

    c_l = L(θ with block l at (1 − α)·θ^l + α·θ_ref^l) − L(θ),

at α = ½ the midpoint layer barrier of the path from θ toward θ_ref with base θ, normalized by the client's
own endpoint (θ_ref as a whole is no model of this client's data, so its loss is not part of the measure);
α = 1 is the cost of replacing the block by the server's value outright.
L is mean cross-entropy on a seeded sample of the client's local training data. Integer buffers are never
interpolated; BatchNorm statistics are interpolated like weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from fedlayer.analysis.barriers import interpolate
from fedlayer.analysis.evaluate import EvalData, Evaluator


def sharing_costs(
    model: nn.Module,
    reference: Mapping[str, Tensor],
    blocks: Mapping[str, Sequence[str]],
    data: EvalData,
    *,
    device: torch.device,
    alpha: float = 0.5,
) -> dict[str, float]:
    """Block -> c_l for every block of ``blocks`` (see the module docstring); one host sync in all.

    Parameters
    ----------
    model : nn.Module
        The client's model θ after local training (its state is read, never changed).
    reference : Mapping[str, Tensor]
        θ_ref; a key it lacks keeps the model's own value (measure only blocks it covers).
    blocks : Mapping[str, Sequence[str]]
        Block name -> its state-dict keys (``fedlayer.models.model_blocks``).
    data : EvalData
        The client's evaluation sample.
    device : torch.device
        Where to evaluate.
    alpha : float
        How far each block moves toward the reference (½: the midpoint barrier).
    """
    own = {key: value.detach() for key, value in model.state_dict().items()}
    evaluator = Evaluator(model, data, device=device, exact=device.type == "cpu")
    own = evaluator.prepare(own)
    ref = evaluator.prepare({**own, **reference})
    points = [own] + [interpolate(own, ref, alpha, set(keys), own) for keys in blocks.values()]
    losses = [loss for loss, _ in evaluator.evaluate_many(points)]
    return {block: losses[i + 1] - losses[0] for i, block in enumerate(blocks)}


def cost_sample(x: Tensor, y: Tensor, samples: int, generator: torch.Generator) -> EvalData:
    """A seeded sample of at most ``samples`` of the client's training data (all of it when smaller)."""
    order = torch.randperm(len(y), generator=generator)[:samples]
    return EvalData(x[order], y[order])
