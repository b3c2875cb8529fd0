"""Layer-wise linear mode connectivity: loss barriers between two models of one architecture.

Notation: for a set S of blocks and a base b ∈ {a, b} the path θ_b^S(α) sets every block in S to
(1−α)·θ_A + α·θ_B and leaves all other blocks at θ_b. Every function here evaluates the two endpoint
models once, queues all path evaluations on the evaluator's device and reads them back with one host
sync.

Rows (:class:`BarrierRow`, one per path and α) keep the raw losses, so any normalization can be recomputed:

- ``barrier`` = L(path(α)) − [(1−α)·L(θ_A) + α·L(θ_B)], normalized by the two *full* endpoint models
  (at α = ½ this is the paper's B_l^b);
- ``path_barrier`` = L(path(α)) − [(1−α)·L(path(0)) + α·L(path(1))], normalized by the ends of the path
  itself, and ``barrier_path_max`` = its maximum over the α grid (only with more than one α);
- the same for the error (1 − accuracy): ``error_barrier``, ``path_error_barrier``,
  ``error_barrier_path_max``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedlayer.analysis.evaluate import Evaluator, read_results
from fedlayer.config import ORDERS

State = Mapping[str, Tensor]
Blocks = Mapping[str, Sequence[str]]
BASES = ("a", "b")
MINIMAL_EDGE = 5  # "minimal" order: this many blocks from each end first
NAN = math.nan


def check_blocks(blocks: Blocks, keys: Collection[str]) -> None:
    """Raise ValueError unless every state-dict key is in exactly one block and blocks hold no other key."""
    listed = Counter(key for block_keys in blocks.values() for key in block_keys)
    repeated = sorted(key for key, count in listed.items() if count > 1)
    missing, unknown = sorted(set(keys) - set(listed)), sorted(set(listed) - set(keys))
    if repeated or missing or unknown:
        raise ValueError(
            f"blocks: every state-dict key must be in exactly one block; in several: {repeated[:5]}, "
            f"in none: {missing[:5]}, not in the model: {unknown[:5]}"
        )


def interpolate(
    sd_a: State, sd_b: State, alpha: float, keys: Collection[str], base: State
) -> dict[str, Tensor]:
    """The path point θ_base^S(α): keys in ``keys`` (S) at (1−α)·θ_A + α·θ_B, all others from ``base``.

    Integer tensors (``num_batches_tracked``) are never interpolated: they come from ``base``.
    ``torch.lerp`` returns θ_A exactly at α = 0 and θ_B exactly at α = 1. Tensors taken from ``base``
    are shared with it, not copied.
    """
    selected = keys if isinstance(keys, (set, frozenset)) else set(keys)
    return {
        key: torch.lerp(sd_a[key], sd_b[key], alpha)
        if key in selected and value.is_floating_point()
        else value
        for key, value in base.items()
    }


def cumulative_order(names: Sequence[str], order: str, seed: int = 0) -> list[str]:
    """Block names in the order blocks are added to S_k for cumulative barriers.

    ``shallow``: as given (shallow to deep); ``deep``: reversed; ``random``: a permutation seeded by
    ``seed``; ``minimal``: the first and last ``MINIMAL_EDGE`` blocks interleaved from the outside in
    (first, last, second, second-to-last, ...; with fewer than 10 blocks, half from each end), then the
    middle blocks shallow to deep.
    """
    if order not in ORDERS:
        raise ValueError(f"analysis.cumulative: {order!r} is not one of {', '.join(ORDERS)}")
    names = list(names)
    if order == "deep":
        return names[::-1]
    if order == "random":
        return random.Random(seed).sample(names, len(names))
    if order == "minimal":
        edge = min(MINIMAL_EDGE, len(names) // 2)
        head, tail = names[:edge], names[len(names) - edge :][::-1]
        return [name for pair in zip(head, tail, strict=True) for name in pair] + names[
            edge : len(names) - edge
        ]
    return names


def random_direction(sd_a: State, sd_b: State, keys: Iterable[str], seed: int = 0) -> dict[str, Tensor]:
    """A Gaussian direction r per floating tensor in ``keys``, with the Frobenius norm of that tensor's
    θ_B − θ_A, so each block's (and each tensor's) displacement norm is preserved.

    The directions are drawn on the CPU from ``seed`` in state-dict order (the same on every device).
    """
    generator = torch.Generator().manual_seed(seed)
    selected = set(keys)
    directions: dict[str, Tensor] = {}
    for key, a in sd_a.items():
        if key in selected and a.is_floating_point() and a.numel() > 0:
            direction = torch.randn(a.shape, generator=generator).to(a.device, a.dtype)
            directions[key] = direction * ((sd_b[key] - a).norm() / direction.norm())
    return directions


def _shifted(state: State, directions: Mapping[str, Tensor], sign: float) -> dict[str, Tensor]:
    """``state`` with ``sign`` · r added to every tensor that has a direction r (others shared)."""
    return {
        key: value + sign * directions[key] if key in directions else value for key, value in state.items()
    }


@dataclass(frozen=True)
class Endpoints:
    """Mean loss and error of the two full endpoint models θ_A and θ_B."""

    loss_a: float
    loss_b: float
    error_a: float
    error_b: float


def evaluate_endpoints(evaluator: Evaluator, sd_a: State, sd_b: State) -> Endpoints:
    """L and error of θ_A and θ_B (one host sync), to pass as ``endpoints`` to several analyses."""
    (loss_a, error_a), (loss_b, error_b) = evaluator.evaluate_many([sd_a, sd_b])
    return Endpoints(loss_a, loss_b, error_a, error_b)


@dataclass(frozen=True)
class BarrierRow:
    """One point α of one interpolation path (see the module docstring for the columns).

    ``kind``: layer | full | cumulative | random; ``order``: the cumulative order ("" otherwise);
    ``base``: the model the blocks outside S come from ("" for full); ``block``: the interpolated block
    (layer, random), the block added at step k (cumulative), "" for full; ``k``: number of blocks in S.
    ``path_*`` columns are NaN when the α grid has a single point.
    """

    kind: str
    order: str
    base: str
    block: str
    k: int
    alpha: float
    loss: float
    error: float
    endpoint_loss_a: float
    endpoint_loss_b: float
    endpoint_error_a: float
    endpoint_error_b: float
    path_loss_0: float
    path_loss_1: float
    path_error_0: float
    path_error_1: float
    barrier: float
    error_barrier: float
    path_barrier: float
    path_error_barrier: float
    barrier_path_max: float
    error_barrier_path_max: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Path:
    kind: str
    order: str
    base: str
    block: str
    k: int
    keys: frozenset[str]
    full: bool


def _excess(value: float, at_0: float, at_1: float, alpha: float) -> float:
    return value - ((1.0 - alpha) * at_0 + alpha * at_1)


def _path_rows(
    path: _Path, alphas: Sequence[float], values: Mapping[float, tuple[float, float]], ends: Endpoints
) -> list[BarrierRow]:
    grid = len(alphas) > 1
    (loss_0, error_0), (loss_1, error_1) = (values[0.0], values[1.0]) if grid else ((NAN, NAN), (NAN, NAN))
    loss_excess = [_excess(values[alpha][0], loss_0, loss_1, alpha) for alpha in alphas]
    error_excess = [_excess(values[alpha][1], error_0, error_1, alpha) for alpha in alphas]
    return [
        BarrierRow(
            kind=path.kind,
            order=path.order,
            base=path.base,
            block=path.block,
            k=path.k,
            alpha=alpha,
            loss=values[alpha][0],
            error=values[alpha][1],
            endpoint_loss_a=ends.loss_a,
            endpoint_loss_b=ends.loss_b,
            endpoint_error_a=ends.error_a,
            endpoint_error_b=ends.error_b,
            path_loss_0=loss_0,
            path_loss_1=loss_1,
            path_error_0=error_0,
            path_error_1=error_1,
            barrier=_excess(values[alpha][0], ends.loss_a, ends.loss_b, alpha),
            error_barrier=_excess(values[alpha][1], ends.error_a, ends.error_b, alpha),
            path_barrier=loss_excess[i],
            path_error_barrier=error_excess[i],
            barrier_path_max=max(loss_excess) if grid else NAN,
            error_barrier_path_max=max(error_excess) if grid else NAN,
        )
        for i, alpha in enumerate(alphas)
    ]


class _PathRun:
    """Queues the evaluations of paths from ``a`` to ``target`` and reads them back with one host sync.

    ``target`` is ``b``, or the random-direction model for the control (whose paths may also start
    elsewhere than θ_A: ``a`` is then the path's start and ``ends`` the real endpoints). Path points that
    are exactly an endpoint model (α = 0 on base a, α = 1 on base b when the target is b, α ∈ {0, 1} when
    S holds every block) reuse that endpoint's evaluation.
    """

    def __init__(self, evaluator: Evaluator, a: State, b: State, target: State, ends: Endpoints | None):
        self.evaluator = evaluator
        self.a, self.target = a, target
        self.bases = {"a": a, "b": b, "": a}
        self._slots: list[Tensor | tuple[float, float]] = []
        if ends is None:
            self.slot_a, self.slot_b = self._queue(a), self._queue(b)
        else:
            self.slot_a, self.slot_b = (
                self._add((ends.loss_a, ends.error_a)),
                self._add((ends.loss_b, ends.error_b)),
            )
        self._slot_target = self.slot_b if target is b else None

    def _add(self, result: Tensor | tuple[float, float]) -> int:
        self._slots.append(result)
        return len(self._slots) - 1

    def _queue(self, state: State) -> int:
        return self._add(self.evaluator.evaluate_tensor(state))

    def _target(self) -> int:
        if self._slot_target is None:
            self._slot_target = self._queue(self.target)
        return self._slot_target

    def _slot(self, path: _Path, alpha: float) -> int:
        base = self.bases[path.base]
        if alpha == 0.0 and (path.full or base is self.a):
            return self.slot_a
        if alpha == 1.0 and (path.full or base is self.target):
            return self._target()
        return self._queue(interpolate(self.a, self.target, alpha, path.keys, base))

    def _read(self) -> list[tuple[float, float]]:
        device = iter(read_results([slot for slot in self._slots if isinstance(slot, Tensor)]))
        return [next(device) if isinstance(slot, Tensor) else slot for slot in self._slots]

    def rows(self, paths: Sequence[_Path], alphas: Sequence[float]) -> list[BarrierRow]:
        grid = list(dict.fromkeys([*alphas, 0.0, 1.0])) if len(alphas) > 1 else list(alphas)
        slots = [[self._slot(path, alpha) for alpha in grid] for path in paths]
        values = self._read()
        (loss_a, error_a), (loss_b, error_b) = values[self.slot_a], values[self.slot_b]
        ends = Endpoints(loss_a, loss_b, error_a, error_b)
        return [
            row
            for path, path_slots in zip(paths, slots, strict=True)
            for row in _path_rows(
                path, alphas, {a: values[s] for a, s in zip(grid, path_slots, strict=True)}, ends
            )
        ]


def _alphas(alphas: Sequence[float]) -> list[float]:
    values = [float(alpha) for alpha in alphas]
    if not values or len(set(values)) != len(values) or not all(0.0 <= a <= 1.0 for a in values):
        raise ValueError(f"analysis.alphas: {list(alphas)} must be distinct values in [0, 1], at least one")
    return values


def _bases(bases: Sequence[str]) -> list[str]:
    if not bases or not set(bases) <= set(BASES):
        raise ValueError(f"bases: {list(bases)} must be a non-empty subset of {', '.join(BASES)}")
    return list(bases)


def _layer_paths(blocks: Blocks, bases: Sequence[str], kind: str) -> list[_Path]:
    full = len(blocks) == 1
    return [
        _Path(kind, "", base, block, 1, frozenset(keys), full)
        for base in _bases(bases)
        for block, keys in blocks.items()
    ]


def _full_path(blocks: Blocks) -> _Path:
    keys = frozenset(key for block_keys in blocks.values() for key in block_keys)
    return _Path("full", "", "", "", len(blocks), keys, True)


def _cumulative_paths(blocks: Blocks, order: str, seed: int, bases: Sequence[str]) -> list[_Path]:
    names = cumulative_order(list(blocks), order, seed)
    prefixes = [
        frozenset(key for name in names[:k] for key in blocks[name]) for k in range(1, len(names) + 1)
    ]
    return [
        _Path("cumulative", order, base, names[k - 1], k, keys, k == len(names))
        for base in _bases(bases)
        for k, keys in enumerate(prefixes, start=1)
    ]


def _prepare(evaluator: Evaluator, sd_a: State, sd_b: State, blocks: Blocks) -> tuple[State, State]:
    check_blocks(blocks, evaluator.keys)
    return evaluator.prepare(sd_a), evaluator.prepare(sd_b)


def _run(
    evaluator: Evaluator,
    sd_a: State,
    sd_b: State,
    blocks: Blocks,
    paths: Sequence[_Path],
    alphas: Sequence[float],
    endpoints: Endpoints | None,
) -> list[BarrierRow]:
    a, b = _prepare(evaluator, sd_a, sd_b, blocks)
    return _PathRun(evaluator, a, b, b, endpoints).rows(paths, _alphas(alphas))


def layer_barriers(
    evaluator: Evaluator,
    sd_a: State,
    sd_b: State,
    blocks: Blocks,
    alphas: Sequence[float] = (0.5,),
    bases: Sequence[str] = BASES,
    endpoints: Endpoints | None = None,
) -> list[BarrierRow]:
    """Layer-wise barriers B_l^b: S = {l} for every block l and every base (``kind="layer"``).

    Parameters
    ----------
    evaluator
        Holds the model template, the data and the numeric / BatchNorm mode.
    sd_a, sd_b
        State dicts of θ_A and θ_B (any device; moved to the evaluator's device once).
    blocks
        Ordered (shallow to deep) block name -> its state-dict keys; every key in exactly one block.
    alphas
        Points of the path; ``(0.5,)`` is the paper's midpoint barrier. With more than one point the
        path-normalized columns are filled too (path(0) and path(1) are evaluated if not in the grid).
    bases
        Which models the blocks outside S come from: ``"a"``, ``"b"`` or both.
    endpoints
        Precomputed :class:`Endpoints` (from :func:`evaluate_endpoints`); None evaluates them once here.

    Returns
    -------
    list[BarrierRow]
        One row per base, block and α (in that nesting order).
    """
    return _run(evaluator, sd_a, sd_b, blocks, _layer_paths(blocks, bases, "layer"), alphas, endpoints)


def full_barrier(
    evaluator: Evaluator,
    sd_a: State,
    sd_b: State,
    blocks: Blocks,
    alphas: Sequence[float] = (0.5,),
    endpoints: Endpoints | None = None,
) -> list[BarrierRow]:
    """The full barrier (S = all blocks, ``kind="full"``): one row per α; see :func:`layer_barriers`."""
    return _run(evaluator, sd_a, sd_b, blocks, [_full_path(blocks)], alphas, endpoints)


def cumulative_barriers(
    evaluator: Evaluator,
    sd_a: State,
    sd_b: State,
    blocks: Blocks,
    order: str = "shallow",
    seed: int = 0,
    alphas: Sequence[float] = (0.5,),
    bases: Sequence[str] = BASES,
    endpoints: Endpoints | None = None,
) -> list[BarrierRow]:
    """Cumulative barriers: S_k = the first k blocks in ``order`` (see :func:`cumulative_order`), for
    k = 1..n and every base (``kind="cumulative"``); the k = n rows equal the full barrier.
    Other parameters as in :func:`layer_barriers`."""
    paths = _cumulative_paths(blocks, order, seed, bases)
    return _run(evaluator, sd_a, sd_b, blocks, paths, alphas, endpoints)


def random_direction_control(
    evaluator: Evaluator,
    sd_a: State,
    sd_b: State,
    blocks: Blocks,
    alphas: Sequence[float] = (0.5,),
    bases: Sequence[str] = BASES,
    seed: int = 0,
    endpoints: Endpoints | None = None,
) -> list[BarrierRow]:
    """Layer-wise barriers along random directions (``kind="random"``).

    For every block, θ_B^l − θ_A^l is replaced by a Gaussian direction r of the same norm (per parameter
    tensor, see :func:`random_direction`), anchored at the base's own endpoint so both bases are equal-norm
    controls: base a moves block l from θ_A^l to θ_A^l + r (other blocks at θ_A), base b from θ_B^l − r to
    θ_B^l (other blocks at θ_B) — at α = ½ both are ‖Δ_l‖/2 from their base, like the real midpoint.
    Buffers (BatchNorm statistics) keep their real values, since a random running variance can be
    negative. ``barrier`` stays normalized by the *real* endpoints θ_A and θ_B, so a random row and the
    layer row of the same block and base differ exactly by the losses on the two paths. Other parameters
    as in :func:`layer_barriers`.
    """
    a, b = _prepare(evaluator, sd_a, sd_b, blocks)
    ends = endpoints if endpoints is not None else evaluate_endpoints(evaluator, a, b)
    return _random_rows(evaluator, a, b, blocks, bases, _alphas(alphas), ends, seed)


def _random_rows(
    evaluator: Evaluator,
    a: State,
    b: State,
    blocks: Blocks,
    bases: Sequence[str],
    alphas: Sequence[float],
    ends: Endpoints,
    seed: int,
) -> list[BarrierRow]:
    directions = random_direction(a, b, evaluator.parameter_keys, seed)
    rows: list[BarrierRow] = []
    for base in _bases(bases):
        # Base a: a -> a + r. Base b: b - r -> b (the run's "a" is then only the path's start).
        source, target = (
            (a, _shifted(a, directions, 1.0)) if base == "a" else (_shifted(b, directions, -1.0), b)
        )
        # Not "full" even for a one-block model: the path may start at b - r, not at the endpoint θ_A.
        paths = [dataclasses.replace(path, full=False) for path in _layer_paths(blocks, [base], "random")]
        rows += _PathRun(evaluator, source, b, target, ends).rows(paths, alphas)
    return rows


def barrier_analysis(
    evaluator: Evaluator,
    sd_a: State,
    sd_b: State,
    blocks: Blocks,
    *,
    alphas: Sequence[float] = (0.5,),
    bases: Sequence[str] = BASES,
    cumulative: Sequence[str] = (),
    random_control: bool = False,
    seed: int = 0,
    endpoints: Endpoints | None = None,
) -> list[BarrierRow]:
    """Layer, full, cumulative (one set per order in ``cumulative``) and optionally random-control rows of
    one pair, with the endpoints evaluated once for all of them. Parameters as in the single analyses."""
    a, b = _prepare(evaluator, sd_a, sd_b, blocks)
    paths = [_full_path(blocks), *_layer_paths(blocks, bases, "layer")]
    paths += [path for order in cumulative for path in _cumulative_paths(blocks, order, seed, bases)]
    rows = _PathRun(evaluator, a, b, b, endpoints).rows(paths, _alphas(alphas))
    if random_control:
        first = rows[0]
        ends = Endpoints(
            first.endpoint_loss_a, first.endpoint_loss_b, first.endpoint_error_a, first.endpoint_error_b
        )
        rows += _random_rows(evaluator, a, b, blocks, bases, _alphas(alphas), ends, seed)
    return rows


def midpoint_barriers(rows: Iterable[BarrierRow], kind: str = "layer", base: str = "a") -> dict[str, float]:
    """Block -> ``path_barrier`` at α = ½ (``barrier`` if the path ends were not evaluated) of the rows of
    one kind and base: the quantity the landscape's second-order prediction approximates."""
    return {
        row.block: row.barrier if math.isnan(row.path_barrier) else row.path_barrier
        for row in rows
        if row.kind == kind and row.base == base and row.alpha == 0.5
    }
