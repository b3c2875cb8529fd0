"""``lmc``'s client side: what a client measures for the server's sharing decision.

- ``lmc_criterion = "barrier"``: in a decision round, the cost of sharing each block, measured on the
  client's own data (:func:`cost_metrics`; the maths is :func:`fedlayer.analysis.sharing.sharing_costs`).
- ``lmc_criterion = "mixing"``: every round, before training, the client starts each block that has a
  server value from θ_l = θ_l^own + w_l (θ_l^server − θ_l^own) and learns w_l ∈ [0, 1] on a held-out slice
  of its training data (:func:`mix`); decision rounds report the weights.

The server side (the decision rules, the policies, their log) is :mod:`strategies.lmc`.

Mixing in detail. θ^own is the client's own copy of every block, as it kept it after its last training
(a dynamic algorithm keeps every key); θ^server is the round's global value of a shared block, or the
server's average of a personal block when the decision round sends that reference. With L the mean
cross-entropy on the held-out slice, evaluated in eval mode,

    dL/dw_l = Σ_{tensors t of l} ⟨∇_t L(θ(w)), θ_t^server − θ_t^own⟩,   w ← clip(w − η ∇_w L, 0, 1),

``lmc_mix_steps`` full-batch steps of rate ``lmc_mix_lr`` per round (η is in weight per nat: the gradient is
the first-order change of the held-out loss from the own block to the server's). Float buffers are mixed by
the same w, integer buffers take the server's value. Batch norm has no derivative for its running statistics,
so by default the gradient sees a norm block's affine parameters only — nearly blind, since clients' γ and β
barely differ while their statistics do (feature shift). With ``lmc_norm = "decide"`` a block with float
buffers adds the statistics' part by a one-sided finite difference (one more forward pass per such block and
step, weight step :data:`STAT_STEP`). The held-out slice is a fixed seeded subset of the training split
(same samples every round, never trained nor fine-tuned on): a fraction ``lmc_holdout``, at least
``lmc_holdout_min`` samples, at most half. w starts at 1 (the server's value), is kept across rounds as the
client state ``mix`` and is not learned in a client's first round (no own copy yet) nor for a block without
a server value in the round (a personal block outside decision rounds).

``lmc_mix_train = false`` keeps the weights as evidence only: the client learns and reports them the same
way but trains from the server's value of every shared block and its own copy of every personal one (and
evaluates that model). Mixing the training start makes a shared block partly personal, so the clients'
copies drift apart, the server's average of them gets worse for each, and the weights fall further: the
evidence feeds on itself. Without it the weights compare the server's average with the client's own copy
under FedAvg's (or the current split's) dynamics.

``lmc_finetune = E`` > 0 adds a last, per-client test on the same slice: after the last round each client
fine-tunes its personalized model (every block, E epochs on its training part, as FedBABU's final fine-tune)
and keeps the fine-tuned copy only if its held-out loss is lower (:func:`finetune_if_better`), so a client
whose shared blocks already serve it best (near-IID data) is not pushed into over-fitting them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from torch import nn
from torch.func import functional_call

from fedlayer.analysis.sharing import cost_sample, sharing_costs
from fedlayer.config import Config, StrategyConfig
from fedlayer.contract import COST_PREFIX, FINETUNE_METRICS, MIX_PREFIX
from fedlayer.experiment import cost_generator, holdout_generator
from fedlayer.models import model_blocks, tail_blocks
from fedlayer.training import evaluate, load_state, train_epochs

if TYPE_CHECKING:
    from fedlayer.client.app import ClientJob
    from fedlayer.client.recipes import LocalTask

MIX_STATE = "mix"  # the client state of the weights: "mix.<block>" -> a 0-d tensor
HOLDOUT_CHUNK = 1024  # held-out samples per forward pass (gradients are summed over chunks)
STAT_STEP = 0.01  # weight step of the finite difference through running statistics (lmc_norm = "decide")

Tensors = Mapping[str, torch.Tensor]


def cost_metrics(job: ClientJob, reference: ArrayRecord | None) -> dict[str, float]:
    """``lmc.<block>`` -> the cost of sharing that block, for the train reply's metrics.

    Costs are measured toward the incoming global blocks and, when the server sent one, its reference for
    the personal ones, on a seeded sample of the local training data. Blocks without a server value are not
    measured.
    """
    server = job.incoming | (reference.to_torch_state_dict() if reference is not None else {})
    generator = cost_generator(job.cfg, job.partition_id, job.server_round)
    sample = cost_sample(job.train_data.x, job.train_data.y, job.cfg.strategy.lmc_samples, generator)
    blocks = {b: keys for b, keys in model_blocks(job.model).items() if set(keys) <= server.keys()}
    alpha = job.cfg.strategy.lmc_alpha
    costs = sharing_costs(job.model, server, blocks, sample, device=job.device, alpha=alpha)
    return {COST_PREFIX + block: cost for block, cost in costs.items()}


def mixing(cfg: Config) -> bool:
    """Whether clients learn mixing weights (``strategy.lmc_criterion = "mixing"``, or ``"shadow"`` for the
    blocks below the model's tail)."""
    return cfg.strategy.name == "lmc" and cfg.strategy.lmc_criterion in ("mixing", "shadow")


def holdout_split(
    n: int, strategy: StrategyConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-out indices) of a client's ``n`` training samples, each sorted."""
    size = min(max(math.ceil(strategy.lmc_holdout * n), strategy.lmc_holdout_min), n // 2)
    order = torch.randperm(n, generator=generator)
    return order[size:].sort().values, order[:size].sort().values


def split(job: ClientJob) -> tuple[torch.Tensor, torch.Tensor]:
    """The client's fixed (training, held-out) indices of its training split."""
    generator = holdout_generator(job.cfg, job.partition_id)
    return holdout_split(len(job.train_data), job.cfg.strategy, generator)


def mixed_state(
    own: Tensors, server: Tensors, blocks: Mapping[str, list[str]], weights: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """θ_t = θ_t^own + w_l (θ_t^server − θ_t^own) for every tensor t of every block l in ``weights``;
    integer tensors (BatchNorm's counter) take the server's value."""
    mixed = {}
    for block, w in weights.items():
        for key in blocks[block]:
            mine, theirs = own[key], server[key].to(own[key].device)
            mixed[key] = mine + w * (theirs - mine) if mine.is_floating_point() else theirs.clone()
    return mixed


def learn_weights(
    model: nn.Module,
    own: Tensors,
    server: Tensors,
    blocks: Mapping[str, list[str]],
    weights: Mapping[str, float],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    lr: float,
    device: torch.device,
    statistics: bool = False,
) -> dict[str, float]:
    """The weights of ``weights``' blocks after ``steps`` projected SGD steps on the held-out loss of
    (x, y) (see the module docstring); ``model``'s other tensors stay at their current values and the model
    itself is left unchanged. ``statistics``: the derivative also sees the float buffers (running
    statistics), by a one-sided finite difference of step :data:`STAT_STEP` per block that has them."""
    names = list(weights)
    if not names or steps == 0 or len(y) == 0:
        return dict(weights)
    params = {name for name, _ in model.named_parameters()}
    current = model.state_dict()
    keys = [(i, key) for i, block in enumerate(names) for key in blocks[block]]
    own = {k: own[k].to(device) for _, k in keys}
    delta = {k: server[k].to(device) - own[k] for _, k in keys if own[k].is_floating_point()}
    buffered = sorted({i for i, k in keys if k in delta and k not in params}) if statistics else []

    def state(w: torch.Tensor, w_buffers: torch.Tensor) -> dict[str, torch.Tensor]:
        mixed = dict(current)
        for i, key in keys:
            if key not in delta:
                mixed[key] = server[key].to(device)
            else:  # buffers (running statistics) take no gradient: batch norm has no derivative for them
                mixed[key] = own[key] + (w[i] if key in params else w_buffers[i]) * delta[key]
        return mixed

    def loss(w: torch.Tensor, w_buffers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out loss and its gradient in ``w`` (the parameters' part)."""
        grad, total = torch.zeros_like(w), torch.zeros((), device=device)
        w = w.detach().requires_grad_(w.requires_grad)
        for start in range(0, len(y), HOLDOUT_CHUNK):
            xb, yb = x[start : start + HOLDOUT_CHUNK].to(device), y[start : start + HOLDOUT_CHUNK].to(device)
            chunk = F.cross_entropy(functional_call(model, state(w, w_buffers), (xb,)), yb, reduction="sum")
            chunk = chunk / len(y)
            if w.requires_grad:
                grad += torch.autograd.grad(chunk, w)[0]
            total += chunk.detach()
        return total, grad

    w = torch.tensor([weights[b] for b in names], dtype=torch.float32, device=device)
    training = model.training
    model.eval()
    try:
        for _ in range(steps):
            at, grad = loss(w.requires_grad_(True), w.detach())
            with torch.no_grad():
                for i in buffered:  # toward the interior, so the step stays in [0, 1]
                    h = -STAT_STEP if w[i] >= STAT_STEP else STAT_STEP
                    moved = w.clone()
                    moved[i] += h
                    grad[i] += (loss(w.detach(), moved)[0] - at) / h
            w = torch.clamp(w.detach() - lr * grad, 0.0, 1.0)
    finally:
        model.train(training)
    return dict(zip(names, w.tolist(), strict=True))


def mix(job: ClientJob, task: LocalTask, reference: ArrayRecord | None) -> dict[str, float]:
    """Learn this round's weights, load the mixed blocks into the task's model (it trains from them) and
    keep the weights; ``mix.<block>`` -> the weight of every block that had a server value (nothing in the
    client's first round: it has no own copy to weigh against, and its weights are the initial 1)."""
    server = job.incoming | (reference.to_torch_state_dict() if reference is not None else {})
    blocks = _mixable(job, server)
    weights = current_weights(task, blocks)
    if blocks and job.own:
        _, held_out = job.holdout
        strategy = job.cfg.strategy
        x, y = job.train_data.x[held_out], job.train_data.y[held_out]
        weights |= learn_weights(
            task.model,
            job.own,
            server,
            blocks,
            {b: weights[b] for b in blocks},
            x,
            y,
            steps=strategy.lmc_mix_steps,
            lr=strategy.lmc_mix_lr,
            device=job.device,
            statistics=strategy.lmc_norm == "decide",
        )
        if strategy.lmc_mix_train:
            load_state(task.model, mixed_state(job.own, server, blocks, {b: weights[b] for b in blocks}))
    task.keep(MIX_STATE, {b: torch.tensor(w) for b, w in weights.items()})
    return {MIX_PREFIX + b: weights[b] for b in blocks} if job.own else {}


def apply_weights(job: ClientJob, task: LocalTask) -> None:
    """The personalized model of an evaluate instruction: the received blocks mixed into the client's own
    copy by the weights it learned last (nothing to mix before it has trained once, nor when the weights
    are evidence only: ``lmc_mix_train = false``)."""
    blocks = _mixable(job, job.incoming)
    if blocks and job.own and job.cfg.strategy.lmc_mix_train:
        weights = current_weights(task, blocks)
        load_state(task.model, mixed_state(job.own, job.incoming, blocks, {b: weights[b] for b in blocks}))


def finetune_if_better(job: ClientJob, task: LocalTask) -> dict[str, float]:
    """The last round's personalized model, fine-tuned (every block, ``lmc_finetune`` epochs on the training
    part) and loaded into the task's model only if that lowers the client's held-out loss; the evaluate
    reply's :data:`~fedlayer.contract.FINETUNE_METRICS` (kept: 0/1, held-out loss before − after)."""
    tuned = copy.deepcopy(task.model)
    train_epochs(
        tuned,
        task.x,
        task.y,
        task.train,
        epochs=job.cfg.strategy.lmc_finetune,
        device=task.device,
        generator=task.generator,
    )
    _, held_out = job.holdout
    x, y = job.train_data.x[held_out], job.train_data.y[held_out]
    gain = evaluate(task.model, x, y, device=job.device)[0] - evaluate(tuned, x, y, device=job.device)[0]
    if gain > 0:
        task.model.load_state_dict(tuned.state_dict())
    kept, gained = FINETUNE_METRICS
    return {kept: float(gain > 0), gained: gain}


def current_weights(task: LocalTask, blocks: Mapping[str, list[str]]) -> dict[str, float]:
    """The kept weight of every block (1, the server's value, for a block never weighed), and ``blocks``'."""
    kept = {b: float(w) for b, w in task.entry(MIX_STATE).items()}
    return kept | {b: kept.get(b, 1.0) for b in blocks}


def _mixable(job: ClientJob, server: Tensors) -> dict[str, list[str]]:
    """The blocks with a server value and an own copy (model order); not the tail blocks that shadows
    decide (``lmc_criterion = "shadow"``)."""
    own = job.own
    shadowed = set(tail_blocks(job.model)) if job.cfg.strategy.lmc_criterion == "shadow" else set()
    return {
        b: keys
        for b, keys in model_blocks(job.model).items()
        if set(keys) <= server.keys() and (not own or set(keys) <= own.keys()) and b not in shadowed
    }
