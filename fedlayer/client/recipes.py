"""Client recipes: what a client does locally in a round, and which model it evaluates as personalized.

An algorithm declaration (:mod:`strategies.algorithms`) names one entry of :data:`RECIPES` and one of
:data:`PERSONALIZATIONS`; this module is the one registry that resolves those names.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedlayer.config import StrategyConfig, TrainConfig
from fedlayer.contract import CRITICAL
from fedlayer.models import (
    ConditionalInputs,
    FeatureBias,
    FeatureSplit,
    PersonalHead,
    RunningMean,
    ValveInput,
    category_logits,
    head_context,
    head_module,
    hooks_of,
)
from fedlayer.training import Proximal, train_epochs
from strategies.algorithms import Algorithm


@dataclass
class LocalTask:
    """One client's local work: its model (global shared + own personal layers) and data."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    train: TrainConfig
    strategy: StrategyConfig
    device: torch.device
    generator: torch.Generator
    head: set[str]  # parameter names of the head group
    shared: set[str]  # parameter names the server averages
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # client state, "<name>.<key>"
    downlink: dict[str, torch.Tensor] = field(default_factory=dict)  # this client's own record (fedcac)
    upload: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # records sent up, by name

    def entry(self, name: str) -> dict[str, torch.Tensor]:
        """The client state ``name`` (declared by the algorithm) by model key; empty before it exists."""
        prefix = name + "."
        return {k[len(prefix) :]: v for k, v in self.state.items() if k.startswith(prefix)}

    def keep(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the client state ``name``; it is saved with the personal keys, never sent."""
        prefix = name + "."
        self.state = {k: v for k, v in self.state.items() if not k.startswith(prefix)}
        self.state |= {prefix + k: v.detach().cpu().clone() for k, v in tensors.items()}

    def run(self, epochs: int, trainable: set[str] | None = None, **kwargs: object) -> float:
        return train_epochs(
            self.model,
            self.x,
            self.y,
            self.train,
            epochs=epochs,
            device=self.device,
            generator=self.generator,
            trainable=trainable,
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def body(self) -> set[str]:
        return {name for name, _ in self.model.named_parameters()} - self.head


def sgd(task: LocalTask) -> float:
    return task.run(task.train.epochs)


def fedprox(task: LocalTask) -> float:
    params = dict(task.model.named_parameters())
    reference = {name: params[name].detach().clone() for name in sorted(task.shared & set(params))}
    return task.run(task.train.epochs, proximal=Proximal(task.strategy.proximal_mu, reference))


def fedrep(task: LocalTask) -> float:
    """Head epochs with the body frozen, then body epochs with the head frozen (Collins et al.)."""
    task.run(task.strategy.head_epochs, trainable=task.head)
    return task.run(task.train.epochs, trainable=task.body)


def fedbabu(task: LocalTask) -> float:
    """The head stays at its initial values during federated rounds (Oh et al.)."""
    return task.run(task.train.epochs, trainable=task.body)


def ditto(task: LocalTask) -> float:
    """Ditto (Li et al., 2021): the personal model v takes ``ditto_epochs`` of SGD on
    CE(v) + mu/2 ||v - w||^2 toward the received global model w; then w trains as in FedAvg (PFLlib's
    order). v is the client state ``personal``; it starts as the first model the client receives."""
    personal = personal_model(task, False)
    if personal is task.model:
        personal = copy.deepcopy(task.model)
    reference = {name: p.detach().clone() for name, p in task.model.named_parameters()}
    train_epochs(
        personal,
        task.x,
        task.y,
        task.train,
        epochs=task.strategy.ditto_epochs,
        device=task.device,
        generator=task.generator,
        proximal=Proximal(task.strategy.ditto_mu, reference),
    )
    task.keep("personal", personal.state_dict())
    return task.run(task.train.epochs)


ALA_THRESHOLD, ALA_NUM_PRE_LOSS = 0.1, 10  # PFLlib's ALA defaults: first round's weights train until the
ALA_MAX_EPOCHS = 100  # std of the last 10 epoch losses < 0.1; PFLlib has no cap, this one is a safeguard


def fedala(task: LocalTask) -> float:
    """FedALA (Zhang et al., 2023): before training, the last ``ala_layer_idx`` parameter tensors become
    θ_l + (θ_g - θ_l) ⊙ W with element-wise weights W in [0, 1] learned on local data (:func:`ala_weights`);
    the others take the global values. Client state: the trained local tensors ``local`` and W
    ``ala_weights``. Round one skips it (the local model is the global one, as in PFLlib)."""
    local = task.entry("local")
    if local:
        start_phase = not task.entry("ala_weights")
        weights = task.entry("ala_weights") or {k: torch.ones_like(v) for k, v in local.items()}
        weights = ala_weights(task, local, weights, until_converged=start_phase)
        _load_mixed(task.model, local, weights)
        task.keep("ala_weights", weights)
    loss = task.run(task.train.epochs)
    params = dict(task.model.named_parameters())
    task.keep("local", {k: params[k] for k in ala_keys(task.model, task.strategy.ala_layer_idx)})
    return loss


def ala_keys(model: nn.Module, layer_idx: int) -> list[str]:
    """FedALA's mixed tensors: the last ``layer_idx`` parameters in registration order (as PFLlib)."""
    return [name for name, _ in model.named_parameters()][-layer_idx:]


def ala_weights(
    task: LocalTask,
    local: dict[str, torch.Tensor],
    weights: dict[str, torch.Tensor],
    *,
    until_converged: bool,
) -> dict[str, torch.Tensor]:
    """Learn FedALA's weights on a random contiguous ``ala_rand_percent`` slice of the local data.

    Per batch, with θ̂ = θ_l + (θ_g - θ_l) ⊙ W and θ_g the model's current (global) values:
    W ← clip(W - η ∇_θ̂ L(θ̂) ⊙ (θ_g - θ_l), 0, 1). One epoch, or (the first time) epochs until the
    population std of the last 10 epoch losses is below 0.1.
    """
    device = task.device
    model = task.model
    glob = {k: v.detach().to(device) for k, v in dict(model.named_parameters()).items() if k in local}
    local = {k: v.to(device) for k, v in local.items()}
    weights = {k: v.to(device).clone() for k, v in weights.items()}
    n = max(int(task.strategy.ala_rand_percent / 100 * len(task.y)), 1)
    start = int(torch.randint(0, len(task.y) - n + 1, (1,), generator=task.generator))
    x, y = task.x[start : start + n], task.y[start : start + n]
    size = min(task.train.batch_size, n)
    model.train()
    losses: list[float] = []
    for _ in range(ALA_MAX_EPOCHS):
        for begin in range(0, n - n % size, size):  # PFLlib's loader drops the last partial batch
            xb, yb = x[begin : begin + size].to(device), y[begin : begin + size].to(device)
            mixed = {k: (local[k] + (glob[k] - local[k]) * weights[k]).requires_grad_() for k in local}
            buffers = {k: v.clone() for k, v in model.named_buffers()}  # train-mode BN must not touch them
            loss = F.cross_entropy(functional_call(model, {**mixed, **buffers}, (xb,)), yb)
            grads = torch.autograd.grad(loss, list(mixed.values()))
            for (k, _), grad in zip(mixed.items(), grads, strict=True):
                weights[k] = torch.clamp(
                    weights[k] - task.strategy.ala_eta * grad * (glob[k] - local[k]), 0, 1
                )
        losses.append(loss.item())
        if not until_converged:
            break
        recent = losses[-ALA_NUM_PRE_LOSS:]
        if len(losses) > ALA_NUM_PRE_LOSS and statistics.pstdev(recent) < ALA_THRESHOLD:
            break
    return {k: v.cpu() for k, v in weights.items()}


def _load_mixed(model: nn.Module, local: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """θ ← θ_l + (θ - θ_l) ⊙ W on the keys of ``local``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, theta_l in local.items():
            theta_l = theta_l.to(params[k].device)
            params[k].copy_(theta_l + (params[k] - theta_l) * weights[k].to(params[k].device))


def balanced_softmax_loss(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Balanced softmax (Ren et al., 2020): CE(logits + log n_y', y), n the client's samples per class."""
    return F.cross_entropy(logits + counts.to(logits.device, logits.dtype).log(), y)


def fedrod(task: LocalTask) -> float:
    """FedRoD (Chen & Chao, 2022): body and generic head g minimise the balanced softmax loss of g(z); the
    personal head p (extension ``rod_head``) minimises CE(g(z).detach() + p(z.detach())). One optimizer
    over both: the two losses touch disjoint parameters, as PFLlib's two optimizers do."""
    heads = _hook(task.model, PersonalHead)
    counts = torch.bincount(task.y).float()

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model(x)
        generic, personal = heads.generic, heads.personal
        assert generic is not None and personal is not None
        per_class = F.pad(counts, (0, generic.shape[1] - len(counts)))
        return balanced_softmax_loss(generic, y, per_class) + F.cross_entropy(generic.detach() + personal, y)

    return task.run(task.train.epochs, loss_fn=loss)


def feddbe(task: LocalTask) -> float:
    """FedDBE (Zhang et al., 2023): the head sees z + client_mean (extension ``dbe``); the features' running
    mean r ← (1 - m) r + m mean_batch(z) is tracked over the round and sent up (the server's average is the
    global mean ḡ); the loss is CE + kl_weight · mean(½ (r - ḡ)²), r keeping the current batch's gradient.
    The first tracked global mean a client receives is kept (client state ``dbe_global``), as PFLlib fixes it
    after its initialization pass; before it exists the client trains without client_mean or the term."""
    features = _hook(task.model, FeatureBias)
    mean = task.model.get_submodule("dbe_mean")
    assert isinstance(mean, RunningMean)
    glob = task.entry("dbe_global").get("mean")
    if glob is None and int(mean.num_batches_tracked) > 0:
        glob = mean.running_mean.detach().clone()
        task.keep("dbe_global", {"mean": glob})
    mean.running_mean.zero_()
    mean.num_batches_tracked.zero_()
    m, weight = task.strategy.dbe_momentum, task.strategy.dbe_kl_weight
    target = glob.to(task.device) if glob is not None else None

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        assert features.features is not None
        running = (1 - m) * mean.running_mean + m * features.features.float().mean(0)
        mean.running_mean.copy_(running.detach())
        mean.num_batches_tracked += 1
        ce = F.cross_entropy(logits, y)
        return ce if target is None else ce + weight * torch.mean(0.5 * (running - target) ** 2)

    frozen = {"dbe_bias.client_mean"} if target is None else set()
    trainable = {name for name, _ in task.model.named_parameters()} - frozen
    return task.run(task.train.epochs, trainable=trainable, loss_fn=loss)


def gpfl(task: LocalTask) -> float:
    """GPFL (Zhang et al., 2023; PFLlib's clientGPFL): with z the body's features, the conditional valve
    (extension ``gpfl``) gives z_p = CoV(z, p) and z_g = CoV(z, g), p and g the personal and generic
    conditional inputs. Loss per batch: CE(head(z_p), y) + CE(cos(z_g, E), y) + λ ‖z_g - E₀[y]‖ (the norm
    over the whole batch, unsquared), E the category embedding, E₀ its value received this round (frozen);
    μ/2 ‖θ‖² on E and the valve is PFLlib's weight decay μ of their optimizers. After training
    g = mean_c E_c and p = Σ_c share_c E_c (share_c: class c's share of the local training data)."""
    valve = _hook(task.model, ValveInput)
    embedding, cov, inputs = valve.embedding, valve.valve, valve.inputs
    received = embedding.weight.detach().clone()
    lam = task.strategy.gpfl_lambda

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        assert valve.features is not None
        generic = cov(valve.features, inputs.generic)
        category = F.cross_entropy(category_logits(generic, embedding.weight), y)
        pull = torch.linalg.vector_norm(generic - received[y])
        return F.cross_entropy(logits, y) + category + lam * pull

    mu = task.strategy.gpfl_mu
    decayed = [f"gpfl_gce.{k}" for k, _ in embedding.named_parameters()]
    decayed += [f"gpfl_cov.{k}" for k, _ in cov.named_parameters()]
    params = dict(task.model.named_parameters())
    decay = Proximal(mu, {k: torch.zeros_like(params[k]) for k in decayed}) if mu > 0 else None
    mean_loss = task.run(task.train.epochs, loss_fn=loss, proximal=decay)
    conditional_inputs(inputs, embedding.weight, task.y)
    return mean_loss


def conditional_inputs(inputs: ConditionalInputs, embedding: torch.Tensor, y: torch.Tensor) -> None:
    """GPFL's conditional inputs from the trained category embedding (classes x features): generic = the
    mean of its rows, personal = their sum weighted by each class's share of the labels ``y``."""
    with torch.no_grad():
        shares = torch.bincount(y, minlength=embedding.shape[0]).to(embedding) / max(len(y), 1)
        inputs.generic.copy_(embedding.mean(0))
        inputs.personal.copy_(shares @ embedding)


CAC_ZERO = 1e-10  # PFLlib's FedCAC: a threshold at or below this is replaced by the least value above 1e-20


def fedcac(task: LocalTask) -> float:
    """FedCAC (Wu et al., 2023): the client takes its critical parameters (client state ``critical``, from
    its last training) from its customized model (the server's ``customized`` record) and the others from the
    global model, trains as in FedAvg, then marks the ``cac_tau`` share of each parameter tensor with the
    largest |Δθ ⊙ θ| as critical and sends the mask up (server: :mod:`strategies.fedcac`)."""
    _take_customized(task.model, task)
    task.downlink = {}  # taken: what is evaluated after training is the trained model
    before = {name: p.detach().clone() for name, p in task.model.named_parameters()}
    loss = task.run(task.train.epochs)
    after = {name: p.detach() for name, p in task.model.named_parameters()}
    mask = critical_mask(before, after, task.strategy.cac_tau)
    task.keep("critical", mask)
    task.upload[CRITICAL] = mask
    return loss


def critical_mask(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], tau: float
) -> dict[str, torch.Tensor]:
    """Per tensor, True where |(θ_after - θ_before) ⊙ θ_after| is among its ``tau`` share of largest values
    (ties at the threshold included; none for a share below one element)."""
    masks = {}
    for name, new in after.items():
        sensitivity = ((new - before[name]) * new).abs()
        flat = sensitivity.flatten()
        count = int(tau * flat.numel())
        threshold = torch.topk(flat, count).values[-1] if count > 0 else torch.tensor(float("inf"))
        if threshold <= CAC_ZERO:
            nonzero = flat[flat > 1e-20]
            if nonzero.numel() > 0:
                threshold = nonzero.min()
        masks[name] = (sensitivity >= threshold).cpu()
    return masks


def _take_customized(model: nn.Module, task: LocalTask) -> None:
    """FedCAC: ``model``'s critical parameters (client state ``critical``) from the customized model, in
    place; the others stay as received."""
    masks = task.entry("critical")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in masks and name in task.downlink:
                own = task.downlink[name].to(param.device, param.dtype)
                param.copy_(torch.where(masks[name].to(param.device), own, param))


CP_BANDWIDTHS = (10.0, 15.0, 20.0, 50.0)  # PFLlib's FedCP MMD, kernel "rbf"


def mmd_rbf(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased squared MMD of two equal-size samples (rows) under Σ_σ exp(-‖a - b‖² / (2σ)), σ in
    ``CP_BANDWIDTHS``: mean over all pairs of k(x_i, x_j) + k(y_i, y_j) - 2 k(x_i, y_j) (PFLlib's ``MMD``).
    In fp32 outside autocast: bf16 squared distances from Gram matrices cancel badly."""
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float().flatten(1), y.float().flatten(1)
        xx, yy, xy = x @ x.T, y @ y.T, x @ y.T
        rx, ry = xx.diagonal(), yy.diagonal()

        def kernel(squared: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.exp(-0.5 * squared / s) for s in CP_BANDWIDTHS]).sum(0)

        xx_d = rx[:, None] + rx[None, :] - 2 * xx
        yy_d = ry[:, None] + ry[None, :] - 2 * yy
        xy_d = rx[:, None] + ry[None, :] - 2 * xy
        return torch.mean(kernel(xx_d) + kernel(yy_d) - 2 * kernel(xy_d))


def fedcp(task: LocalTask) -> float:
    """FedCP (Zhang et al., 2023; PFLlib's ``clientCP``): the extension ``cp`` splits the features z of the
    body between the personal head h_p and the global head h_g by the policy's masks (Gumbel noise from the
    task's generator, context c from h_p fixed for the round). Body, h_p and policy minimise
    CE(h_p(z ⊙ pm) + h_g(z ⊙ gm)) + cp_lambda · MMD(z, z₀), z₀ the features of the received body (frozen)
    on the same batch; h_g is frozen. Before upload h_g ← ½ h_p + ½ h_g.

    Unlike PFLlib, evaluation masks are noise-free (PFLlib samples Gumbel noise when testing too), and a
    client's first round takes c from its initial personal head (PFLlib: a uniform random vector until the
    first global head arrives). c is the same in every later round either way: the rows of CE's gradient
    with respect to h_p's weight sum to zero, so plain SGD never changes their sum."""
    split = _hook(task.model, FeatureSplit)
    glob = head_module(task.model)
    frozen = {id(p) for p in glob.parameters()}
    trainable = {name for name, p in task.model.named_parameters() if id(p) not in frozen}
    received = copy.deepcopy(task.model).train().requires_grad_(False)
    received_split = _hook(received, FeatureSplit)
    received_split.active = False  # only its body's features are used
    weight = task.strategy.cp_lambda

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(model(x), y)
        if weight == 0:
            return ce
        with torch.no_grad():
            received(x)
        assert split.features is not None and received_split.features is not None
        return ce + weight * mmd_rbf(split.features, received_split.features)

    split.context, split.generator = head_context(split.personal_head), task.generator
    try:
        mean_loss = task.run(task.train.epochs, trainable=trainable, loss_fn=loss)
    finally:
        split.context, split.generator, split.features = None, None, None
    with torch.no_grad():
        for g, p in zip(glob.parameters(), split.personal_head.parameters(), strict=True):
            g.copy_(0.5 * p + 0.5 * g)
    return mean_loss


H = TypeVar("H", PersonalHead, FeatureBias, FeatureSplit, ValveInput)


def _hook(model: nn.Module, kind: type[H]) -> H:
    return next(h for h in hooks_of(model) if isinstance(h, kind))


def as_is(task: LocalTask, last_round: bool) -> nn.Module:
    """The trained model itself."""
    return task.model


def finetune(task: LocalTask, last_round: bool) -> nn.Module:
    """FedBABU: fine-tune on local data first, on a copy so the frozen head stays the federated state.

    ``strategy.finetune = "head"`` tunes the head for ``finetune_steps`` steps before every evaluation;
    ``"final"`` (PFLlib's protocol) tunes the whole model for ``finetune_epochs`` epochs, only for the
    evaluation after the last round.
    """
    strategy = task.strategy
    if strategy.finetune == "head" and strategy.finetune_steps > 0:
        steps = strategy.finetune_steps
        return _finetuned(task, epochs=steps, trainable=task.head, steps=steps)
    if strategy.finetune == "final" and last_round and strategy.finetune_epochs > 0:
        return _finetuned(task, epochs=strategy.finetune_epochs, trainable=None, steps=0)
    return task.model


def personal_model(task: LocalTask, last_round: bool) -> nn.Module:
    """Ditto: the personal model (client state ``personal``); the received model before it exists."""
    personal = task.entry("personal")
    if not personal:
        return task.model
    model = copy.deepcopy(task.model)
    model.load_state_dict(personal)
    return model


def ala_mixed(task: LocalTask, last_round: bool) -> nn.Module:
    """FedALA: a copy of the model with the local tensors mixed in by the weights learned so far (PFLlib
    evaluates after learning them in the round; relearning here would draw data the training draws again).
    After training the local tensors are the model's own, so the model is evaluated as trained."""
    local, weights = task.entry("local"), task.entry("ala_weights")
    if not local or not weights:
        return task.model
    model = copy.deepcopy(task.model)
    _load_mixed(model, local, weights)
    return model


def cac_customized(task: LocalTask, last_round: bool) -> nn.Module:
    """FedCAC: the received model with the critical parameters taken from the customized model (what the
    client would train from); after training in the same instruction, the trained model."""
    if not task.downlink:
        return task.model
    model = copy.deepcopy(task.model)
    _take_customized(model, task)
    return model


RECIPES: dict[str, Callable[[LocalTask], float]] = {
    "sgd": sgd,
    "fedprox": fedprox,
    "fedrep": fedrep,
    "fedbabu": fedbabu,
    "ditto": ditto,
    "fedala": fedala,
    "fedrod": fedrod,
    "feddbe": feddbe,
    "fedcac": fedcac,
    "fedcp": fedcp,
    "gpfl": gpfl,
}
PERSONALIZATIONS: dict[str, Callable[[LocalTask, bool], nn.Module]] = {
    "as_is": as_is,
    "finetune": finetune,
    "personal_model": personal_model,
    "ala_mixed": ala_mixed,
    "cac_customized": cac_customized,
}


def train_locally(algorithm: Algorithm, task: LocalTask) -> float:
    """Run the algorithm's local training on ``task``; the mean training loss."""
    return RECIPES[algorithm.recipe](task)


def personalize(algorithm: Algorithm, task: LocalTask, *, last_round: bool = False) -> nn.Module:
    """The model a client evaluates as its personalized model (``last_round``: after the final round)."""
    return PERSONALIZATIONS[algorithm.personalization](task, last_round)


def _finetuned(task: LocalTask, *, epochs: int, trainable: set[str] | None, steps: int) -> nn.Module:
    """A copy of the task's model trained on its local data (``steps`` > 0 stops after that many steps)."""
    tuned = copy.deepcopy(task.model)
    train_epochs(
        tuned,
        task.x,
        task.y,
        task.train,
        epochs=epochs,
        device=task.device,
        generator=task.generator,
        trainable=trainable,
        max_steps=steps,
    )
    return tuned
