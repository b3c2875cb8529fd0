"""``lmc_criterion = "shadow"``'s client side: shadows of the tail blocks, trained beside them, and the
held-out gain of sharing each (the server side, the rule over rounds: :class:`strategies.lmc.ShadowPolicy`).

The tail is the model's upper blocks that its ``tail(z)`` computes from the input z of the first of them
(:func:`fedlayer.models.tail_blocks`: fc1 and fc2 of the CNNs). For every tail block l the client keeps a
*shadow* copy in the other regime:

- l shared: the shadow follows the *personal* trajectory: the client's own copy, trained every round and never
  replaced by the server's value;
- l personal: the shadow follows the *shared* trajectory: it starts every round from the server's average of
  the clients' shadows of l (sent as the reference; the client's reply carries its shadows of personal tail
  blocks in a ``shadow`` record, which the server averages in place of their own copies).

Both copies of l are trained by the same SGD on the same batches: each step adds, for every l, the loss of
the tail evaluated with l's shadow on the step's (detached) z, the other tail blocks as the model has them
(detached), so the model's own trajectory is exactly the one it has without shadows, and a shadow costs one
forward and backward of the tail only (for the CNNs ~12 % of a step's multiply-adds per tail block). After
training, on the client's held-out slice (the one mixing uses, never trained on): the held-out gain of sharing
l is g_l = L(tail with l's personal copy) − L(tail with l's shared copy), > 0 when sharing l does better for
this client after the same adaptation. The lower blocks are decided by mixing weights as ``"mixing"`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from torch import nn
from torch.func import functional_call

from fedlayer.contract import SHADOW, SHADOW_PREFIX
from fedlayer.models import block_modules, model_blocks, tail_blocks

if TYPE_CHECKING:
    from fedlayer.client.app import ClientJob
    from fedlayer.client.recipes import LocalTask

SHADOW_STATE = "shadow"  # the client state of the shadows: "shadow.<key>" -> tensor
ROLE_STATE = "shadow_role"  # "shadow_role.<block>" -> 1 if the shadow is the personal copy, 0 the shared one
SHADOW_MODULE = "lmc_shadows"  # where the shadows hang in the model while it trains (so SGD steps them)

Tensors = dict[str, torch.Tensor]


def shadowing(job: ClientJob) -> bool:
    """Whether the client trains shadows (``strategy.lmc_criterion = "shadow"``)."""
    strategy = job.cfg.strategy
    return strategy.name == "lmc" and strategy.lmc_criterion == "shadow"


def tail_keys(model: nn.Module) -> dict[str, list[str]]:
    """Tail block -> its state-dict keys, in tail order."""
    blocks = model_blocks(model)
    return {block: blocks[block] for block in tail_blocks(model)}


class Shadows(nn.Module):
    """The shadows as parameters (state-dict keys with '.' are not parameter names: ``/`` stands in)."""

    def __init__(self, start: Tensors) -> None:
        super().__init__()
        self.values = nn.ParameterDict(
            {
                key.replace(".", "/"): nn.Parameter(value.detach().clone().float())
                for key, value in start.items()
            }
        )

    def get(self, key: str) -> torch.Tensor:
        return self.values[key.replace(".", "/")]

    def tensors(self) -> Tensors:
        return {key.replace("/", "."): value.detach().clone() for key, value in self.values.items()}


class _Tail(nn.Module):
    """``model.tail`` as a module's forward, so :func:`torch.func.functional_call` can swap its tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.tail(z)  # type: ignore[operator]


@contextmanager
def tail_input(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, the input of the model's first tail block at each forward, detached, lands in the list."""
    seen: list[torch.Tensor] = []
    first = block_modules(model)[tail_blocks(model)[0]]

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen[:] = [inputs[0].detach()]

    handle = first.register_forward_pre_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def shadow_logits(
    model: nn.Module, tail: dict[str, list[str]], shadows: Shadows, block: str, z: torch.Tensor
) -> torch.Tensor:
    """The tail's logits on z with ``block``'s shadow in place of the model's copy; the other tail tensors
    are the model's, detached (a shadow's loss trains the shadow alone)."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    values = {
        f"model.{key}": shadows.get(key) if b == block else own[key].detach()
        for b, keys in tail.items()
        for key in keys
    }
    return functional_call(_Tail(model), values, (z,))


def start_values(
    job: ClientJob, task: LocalTask, reference: ArrayRecord | None
) -> tuple[Tensors, dict[str, bool]]:
    """Each tail key's shadow at the start of the round, and per tail block whether its shadow is the
    personal copy (the block is shared this round). See the module docstring; a shadow that changes role
    (its block switched regime) starts from the copy that followed the other trajectory: the client's own
    copy (now personal: it was the model's) or the server's value (now shared: the round's reference)."""
    tail = tail_keys(job.model)
    received = set(job.received)
    server = reference.to_torch_state_dict() if reference is not None else {}
    kept, roles = task.entry(SHADOW_STATE), task.entry(ROLE_STATE)
    start: Tensors = {}
    personal_role: dict[str, bool] = {}
    for block, keys in tail.items():
        shared = set(keys) <= received
        personal_role[block] = shared
        was = bool(roles[block]) if block in roles else None
        for key in keys:
            if shared:  # the personal trajectory
                if was is True:
                    start[key] = kept[key]
                elif was is False:
                    start[key] = job.own.get(key, job.incoming[key])  # the client's personal copy until now
                else:
                    start[key] = job.incoming[key]  # the client's first round
            else:  # the shared trajectory: the server's average of the shadows when sent
                start[key] = server.get(key, kept.get(key, job.model.state_dict()[key]))
    return start, personal_role


def train_with_shadows(
    job: ClientJob, task: LocalTask, reference: ArrayRecord | None
) -> tuple[float, dict[str, float]]:
    """Train the model with the algorithm's SGD and every tail block's shadow beside it; keep the shadows and
    their roles, queue the shadows of personal blocks for the reply; return (the model's mean training loss,
    ``shadow.<block>`` -> the held-out gain of sharing that block)."""
    model = task.model
    tail = tail_keys(model)
    start, personal_role = start_values(job, task, reference)
    shadows = Shadows(start).to(job.device)
    model.add_module(SHADOW_MODULE, shadows)
    losses: list[torch.Tensor] = []
    try:
        with tail_input(model) as seen:
            task.run(task.train.epochs, loss_fn=_with_shadow_losses(tail, shadows, seen, losses))
    finally:
        delattr(model, SHADOW_MODULE)
    values = shadows.tensors()
    task.keep(SHADOW_STATE, values)
    task.keep(ROLE_STATE, {b: torch.tensor(float(role)) for b, role in personal_role.items()})
    personal = [key for block, keys in tail.items() if not personal_role[block] for key in keys]
    if personal:
        task.upload[SHADOW] = {key: values[key].cpu() for key in personal}
    train_loss = float(torch.stack(losses).mean()) if losses else 0.0
    return train_loss, held_out_gains(job, tail, shadows, personal_role)


def uploaded_keys(job: ClientJob, task: LocalTask) -> list[str]:
    """The model's keys a full-model reply carries outside analysis rounds: all but those whose shadows go up
    in their place (the server averages the shadows as the reference; uplink stays at FedAvg's)."""
    replaced = set(task.upload.get(SHADOW, {}))
    return [key for key in job.model.state_dict() if key not in replaced]


def _with_shadow_losses(
    tail: dict[str, list[str]], shadows: Shadows, seen: list[torch.Tensor], losses: list[torch.Tensor]
) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        main = F.cross_entropy(model(x), y)
        losses.append(main.detach())
        z = seen[0]
        extra = [F.cross_entropy(shadow_logits(model, tail, shadows, block, z), y) for block in tail]
        return main + torch.stack(extra).sum()

    return loss


@torch.no_grad()
def held_out_gains(
    job: ClientJob, tail: dict[str, list[str]], shadows: Shadows, personal_role: dict[str, bool]
) -> dict[str, float]:
    """``shadow.<block>`` -> L(personal copy) − L(shared copy) on the client's held-out slice."""
    model = job.model
    _, held = job.holdout
    if len(held) == 0:
        return {}
    x, y = job.train_data.x[held].to(job.device), job.train_data.y[held].to(job.device)
    training = model.training
    model.eval()
    try:
        with tail_input(model) as seen:
            own = F.cross_entropy(model(x), y)
        z = seen[0]
        gains = {}
        for block in tail:
            other = F.cross_entropy(shadow_logits(model, tail, shadows, block, z), y)
            personal, shared = (other, own) if personal_role[block] else (own, other)
            gains[SHADOW_PREFIX + block] = float(personal - shared)
    finally:
        model.train(training)
    return gains
