"""Model extensions: modules an algorithm adds to any model with ``head`` / ``body`` groups (FedRoD's second
head, ...), built by :func:`fedlayer.experiment.initial_model` on the server and every client alike, so the
state dict — and with it the shared / personal key selection — includes them.

An extension is attached to the model's own module tree (its keys are ``<name>.<tensor>`` beside the model's
unchanged keys) and works through a forward hook on the head block, whose input is the body's features.
The declaration (:mod:`strategies.algorithms`) names the extension and says which of its blocks are shared.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from fedlayer.config import StrategyConfig
from fedlayer.models import block_modules, model_groups, model_name


def head_module(model: nn.Module) -> nn.Module:
    """The model's classifier: the single block of its class's ``head`` group (extensions add theirs to the
    instance's), whose input is the body's features."""
    head = [b for b in model_groups(model)["head"] if b in getattr(type(model), "HEAD_BLOCKS", ())]
    if len(head) != 1:
        raise TypeError(f"{model_name(model)}: an extension needs a head group of one block; it has {head}")
    return block_modules(model)[head[0]]


class DomainBias(nn.Module):
    """FedDBE's personal representation bias (PFLlib's ``client_mean``), added to the body's features."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.client_mean = nn.Parameter(torch.zeros(features))


class RunningMean(nn.Module):
    """FedDBE's running mean of the body's features over a round (shared: the server's sample-weighted
    average is the global mean); ``num_batches_tracked`` > 0 marks an average of real statistics."""

    running_mean: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))


class FeatureBias:
    """FedDBE's forward: the head sees z + client_mean; each forward keeps z (``features``) for the loss."""

    def __init__(self, bias: DomainBias) -> None:
        self.bias = bias
        self.active = True
        self.features: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict[int, object]) -> FeatureBias:
        twin = FeatureBias(copy.deepcopy(self.bias, memo))
        twin.active = self.active
        return twin

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.features = inputs[0]
        if not self.active:
            return inputs
        return (inputs[0] + self.bias.client_mean, *inputs[1:])


class PersonalHead:
    """FedRoD's forward: logits = g(z) + p(z.detach()), g the generic head, p the personal one on the same
    features z. Each forward keeps both outputs (``generic``, ``personal``) for the recipe's loss;
    ``active = False`` gives g(z) alone (the global model, evaluated on the server)."""

    def __init__(self, personal: nn.Module) -> None:
        self.personal_head = personal
        self.active = True
        self.generic: torch.Tensor | None = None
        self.personal: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict[int, object]) -> PersonalHead:
        # A copy of the model gets a hook on its own personal head; the last outputs (graph tensors) stay.
        twin = PersonalHead(copy.deepcopy(self.personal_head, memo))
        twin.active = self.active
        return twin

    def __call__(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        self.generic = output
        if not self.active:
            return output
        self.personal = self.personal_head(inputs[0].detach())
        return output + self.personal


def rod_head(model: nn.Module, strategy: StrategyConfig) -> None:
    """FedRoD (Chen & Chao, 2022): a personal head ``rod_head``, a copy of the initial generic head (as
    PFLlib), on the body's features; it joins the ``head`` group."""
    head = head_module(model)
    personal = copy.deepcopy(head)
    model.add_module("rod_head", personal)
    heads: tuple[str, ...] = tuple(getattr(model, "HEAD_BLOCKS", ()))
    model.HEAD_BLOCKS = (*heads, "rod_head")  # type: ignore[assignment]
    head.register_forward_hook(PersonalHead(personal))


def feature_size(head: nn.Module) -> int:
    """Width of the features a head takes (its weight's input dimension)."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise TypeError(f"an extension needs a head block with a weight; got {type(head).__name__}")
    return int(weight.shape[1])


def dbe(model: nn.Module, strategy: StrategyConfig) -> None:
    """FedDBE (Zhang et al., 2023): ``dbe_bias`` (personal bias of the features) and ``dbe_mean`` (their
    running mean, shared) on the head's input."""
    head = head_module(model)
    features = feature_size(head)
    bias = DomainBias(features)
    model.add_module("dbe_bias", bias)
    model.add_module("dbe_mean", RunningMean(features))
    head.register_forward_pre_hook(FeatureBias(bias))


EXTENSIONS: dict[str, Callable[[nn.Module, StrategyConfig], None]] = {"rod_head": rod_head, "dbe": dbe}


def extend(model: nn.Module, name: str | None, strategy: StrategyConfig) -> nn.Module:
    """``model`` with the extension ``name`` attached (``None``: unchanged)."""
    if name is not None:
        EXTENSIONS[name](model, strategy)
    return model


def hooks_of(model: nn.Module) -> list[PersonalHead | FeatureBias]:
    """The extension hooks on the model's modules (a deep copy of a model has its own)."""
    hooks = [h for m in model.modules() for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]]
    return [h for h in hooks if isinstance(h, PersonalHead | FeatureBias)]


def global_view(model: nn.Module) -> nn.Module:
    """The model as the server evaluates it: the extensions' personal parts off (FedRoD: g(z) alone; FedDBE:
    no personal bias)."""
    for hook in hooks_of(model):
        hook.active = False
    return model
