"""Fast loss / error evaluation of state dicts on one device (plain torch: no Flower, no Ray).

An :class:`Evaluator` keeps one copy of the model template and the evaluation data on its device and
evaluates any state dict of that architecture through ``torch.func.functional_call``: the template is
never copied again. Losses and correct counts are summed in device tensors; a result is read back with
one host sync (:meth:`Evaluator.evaluate`), or many results with one sync in total (:func:`read_results`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from fedlayer.config import BN_MODES

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``(outputs, targets) -> loss summed over the batch`` (a 0-d tensor)."""
CorrectFn = Callable[[Tensor, Tensor], Tensor]
"""``(outputs, targets) -> number of correct predictions in the batch`` (a 0-d tensor)."""
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy, computed in at least fp32 whatever the autocast dtype of the logits."""
    return F.cross_entropy(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum"
    )


def correct_count(logits: Tensor, targets: Tensor) -> Tensor:
    """Number of arg-max predictions equal to the class targets."""
    return (logits.argmax(1) == targets).sum()


@dataclass(frozen=True)
class EvalData:
    """Inputs ``x`` and targets ``y`` of an evaluation set, ideally resident on the evaluation device."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y) or len(self.y) == 0:
            raise ValueError(f"EvalData: x has {len(self.x)} samples, y has {len(self.y)}; need equal, > 0")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> EvalData:
        return EvalData(self.x.to(device), self.y.to(device))

    def head(self, n: int | None) -> EvalData:
        """The first ``n`` samples (all when ``n`` is None or larger than the set)."""
        return self if n is None or n >= len(self) else EvalData(self.x[:n], self.y[:n])

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self), batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]


@contextlib.contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """True fp32 on CUDA: no TF32 in cuDNN convolutions or matmuls (restored on exit); no-op elsewhere."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast("cuda", enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def read_results(results: Sequence[Tensor]) -> list[tuple[float, float]]:
    """``(loss, error)`` of device results from :meth:`Evaluator.evaluate_tensor`, with one host sync."""
    if not results:
        return []
    return [(loss, error) for loss, error in torch.stack(list(results)).tolist()]


class Evaluator:
    """Mean loss and error of state dicts of one architecture on data resident on one device.

    Parameters
    ----------
    model
        Template of the architecture; deep-copied once onto the device (its own weights are never used).
    data
        Evaluation set, an :class:`EvalData` or ``(x, y)``; moved to ``device`` once if it is elsewhere.
    device
        Evaluation device; default: the device of ``data.x``.
    batch_size
        Samples per forward pass; default 2048 on CUDA, 256 elsewhere (larger CPU batches lose the cache).
    exact
        True: fp32 everywhere (no autocast, no TF32). False: on CUDA bf16 autocast and channels_last for
        4-D inputs and weights; on CPU the same as exact.
    bn
        ``interpolate``: BatchNorm running statistics are used as they are in the state dict.
        ``reset``: they are re-estimated on the data for every evaluated state (endpoints included):
        reset, then forward passes with the BatchNorm layers in train mode (cumulative average,
        ``momentum=None``) under ``no_grad``; other layers (e.g. dropout) stay in eval mode.
    bn_samples
        Number of leading samples of ``data`` used to re-estimate BatchNorm statistics (None: all).
    loss_fn
        Loss summed over a batch; cross-entropy by default.
    correct_fn
        Correct predictions in a batch (arg-max accuracy by default); None reports the error as NaN
        (e.g. for regression losses).
    """

    def __init__(
        self,
        model: nn.Module,
        data: EvalData | tuple[Tensor, Tensor],
        *,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        exact: bool = False,
        bn: str = "interpolate",
        bn_samples: int | None = None,
        loss_fn: LossFn = cross_entropy_sum,
        correct_fn: CorrectFn | None = correct_count,
    ) -> None:
        if bn not in BN_MODES:
            raise ValueError(f"analysis.bn: {bn!r} is not one of {', '.join(BN_MODES)}")
        data = data if isinstance(data, EvalData) else EvalData(*data)
        self.device = torch.device(device) if device is not None else data.x.device
        batch_size = batch_size or (2048 if self.device.type == "cuda" else 256)
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be >= 1")
        self.exact = exact
        self.channels_last = not exact and self.device.type == "cuda"
        self.batch_size = batch_size
        self.bn = bn
        self.loss_fn = loss_fn
        self.correct_fn = correct_fn
        self.model = copy.deepcopy(model).to(self.device).eval().requires_grad_(False)
        self.keys = frozenset(self.model.state_dict())
        self.parameter_keys = frozenset(name for name, _ in self.model.named_parameters())
        self.data = self._resident(data.to(self.device))
        self.bn_data = self.data.head(bn_samples)
        self._bn_modules = {
            prefix: module
            for prefix, module in self.model.named_modules()
            if isinstance(module, _BatchNorm) and module.track_running_stats
        }
        for module in self._bn_modules.values():
            module.momentum = None  # cumulative average: only train-mode passes (bn="reset") use it

    def _resident(self, data: EvalData) -> EvalData:
        if self.channels_last and data.x.dim() == 4:
            return EvalData(data.x.contiguous(memory_format=torch.channels_last), data.y)
        return data

    def precision(self) -> contextlib.AbstractContextManager[None]:
        """The numeric mode of this evaluator: bf16 autocast (fast, CUDA) or true fp32."""
        if self.exact or self.device.type != "cuda":
            return ieee_fp32(self.device)
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def prepare(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``state`` on the device (channels_last 4-D floats in fast CUDA mode); tensors already there are
        reused, not copied.

        Raises
        ------
        KeyError
            If the keys differ from the template's state-dict keys.
        """
        if state.keys() != self.keys:
            missing, unknown = sorted(self.keys - state.keys()), sorted(state.keys() - self.keys)
            raise KeyError(
                f"state dict does not match the model: missing {missing[:5]}, unknown {unknown[:5]}"
            )
        return {key: self._on_device(value) for key, value in state.items()}

    def _on_device(self, value: Tensor) -> Tensor:
        value = value.to(self.device)
        if self.channels_last and value.dim() == 4 and value.is_floating_point():
            return value.contiguous(memory_format=torch.channels_last)
        return value

    def reestimate_bn(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A copy of ``state`` whose BatchNorm running statistics are re-estimated on ``bn_data``.

        Only the statistics are new tensors; the other entries are shared with ``state``.
        """
        fresh = dict(state)
        for prefix in self._bn_modules:
            mean, var, count = (_key(prefix, name) for name in BN_STATS)
            fresh[mean], fresh[var] = torch.zeros_like(state[mean]), torch.ones_like(state[var])
            fresh[count] = torch.zeros_like(state[count])
        with torch.no_grad(), self.precision(), self._bn_train():
            for xb, _ in self.bn_data.batches(self.batch_size):
                functional_call(self.model, fresh, (xb,))  # updates the fresh statistics in place
        return fresh

    @contextlib.contextmanager
    def _bn_train(self) -> Iterator[None]:
        for module in self._bn_modules.values():
            module.train()
        try:
            yield
        finally:
            self.model.eval()

    def evaluate_tensor(self, state: Mapping[str, Tensor]) -> Tensor:
        """``[mean loss, error]`` (float64, on the device) of ``state``, queued without any host sync."""
        state = self.prepare(state)
        if self.bn == "reset" and self._bn_modules:
            state = self.reestimate_bn(state)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad(), self.precision():
            for xb, yb in self.data.batches(self.batch_size):
                totals += self._batch_totals(functional_call(self.model, state, (xb,)), yb)
        n = len(self.data)
        error = 1.0 - totals[1] / n if self.correct_fn is not None else torch.full_like(totals[1], math.nan)
        return torch.stack([totals[0] / n, error])

    def _batch_totals(self, outputs: Tensor, targets: Tensor) -> Tensor:
        loss = self.loss_fn(outputs, targets)
        correct = self.correct_fn(outputs, targets) if self.correct_fn is not None else torch.zeros_like(loss)
        return torch.stack([loss.double(), correct.double()])

    def evaluate(self, state: Mapping[str, Tensor]) -> tuple[float, float]:
        """Mean loss and error (1 − accuracy) of ``state`` on the data; one host sync."""
        return read_results([self.evaluate_tensor(state)])[0]

    def evaluate_many(self, states: Iterable[Mapping[str, Tensor]]) -> list[tuple[float, float]]:
        """:meth:`evaluate` for several states, with one host sync for all of them."""
        return read_results([self.evaluate_tensor(state) for state in states])
