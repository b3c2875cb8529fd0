"""Local training and evaluation loops (plain torch: no Flower, no Ray)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedlayer.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    # bf16 autocast on CUDA needs no loss scaling; CPU stays exact fp32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    end = len(y) - len(y) % batch_size if drop_last else len(y)
    for start in range(0, end, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


@dataclass
class Proximal:
    """FedProx term ``mu/2 * ||w - w_global||^2`` over the named parameters."""

    mu: float
    reference: dict[str, torch.Tensor]

    def __call__(self, model: nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        terms = [(params[name] - ref).pow(2).sum() for name, ref in self.reference.items()]
        return 0.5 * self.mu * torch.stack(terms).sum()


def set_trainable(model: nn.Module, trainable: set[str] | None) -> list[nn.Parameter]:
    """Freeze every parameter outside ``trainable`` (``None``: all trainable); return the trainable ones."""
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(trainable is None or name in trainable)
        if param.requires_grad:
            params.append(param)
    return params


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainConfig,
    *,
    epochs: int,
    device: torch.device,
    generator: torch.Generator,
    trainable: set[str] | None = None,
    proximal: Proximal | None = None,
    max_steps: int = 0,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """SGD with momentum / weight decay over ``(x, y)``; returns the mean training loss.

    Losses are summed on the device and read once at the end (no per-batch host sync).
    ``max_steps`` > 0 stops after that many optimizer steps (FedBABU's head fine-tuning). ``loss_fn(model,
    x, y)`` replaces the cross-entropy of ``model(x)`` (FedRoD's two heads).
    """
    params = set_trainable(model, trainable)
    optimizer = torch.optim.SGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    model.train()
    total, steps = torch.zeros((), device=device), 0
    batches = (
        b for _ in range(epochs) for b in _batches(x, y, settings.batch_size, generator, settings.drop_last)
    )
    for xb, yb in itertools.islice(batches, max_steps or None):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with _autocast(device):
            loss = loss_fn(model, xb, yb) if loss_fn is not None else F.cross_entropy(model(xb), yb)
        if proximal is not None:
            loss = loss + proximal(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach().float()
        steps += 1
    set_trainable(model, None)
    return total.item() / max(steps, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, one host sync at the end."""
    model.eval()
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for xb, yb in _batches(x, y, batch_size, None):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        with _autocast(device):
            logits = model(xb)
        loss += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    n = max(len(y), 1)
    loss_value, correct_value = torch.stack([loss, correct.to(loss.dtype)]).tolist()
    return loss_value / n, correct_value / n


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a (possibly partial) state dict, checking that every key is known."""
    missing = set(state) - set(model.state_dict())
    if missing:
        raise KeyError(f"unknown state-dict keys: {sorted(missing)[:5]}")
    model.load_state_dict(dict(state), strict=False)
