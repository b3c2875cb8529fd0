"""Client recipes: what a client does locally in a round, per algorithm."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedlayer.config import StrategyConfig, TrainConfig
from fedlayer.training import Proximal, train_epochs


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


RECIPES: dict[str, Callable[[LocalTask], float]] = {
    "sgd": sgd,
    "fedprox": fedprox,
    "fedrep": fedrep,
    "fedbabu": fedbabu,
}


def personalize(recipe: str, task: LocalTask) -> nn.Module:
    """The model a client evaluates as its personalized model.

    FedBABU fine-tunes the head for ``strategy.finetune_steps`` steps on local data first (on a copy,
    so the frozen head stays the federated state); every other recipe evaluates the model as is.
    """
    if recipe != "fedbabu" or task.strategy.finetune_steps == 0:
        return task.model
    tuned = copy.deepcopy(task.model)
    train_epochs(
        tuned,
        task.x,
        task.y,
        task.train,
        epochs=task.strategy.finetune_steps,  # enough epochs; max_steps stops it
        device=task.device,
        generator=task.generator,
        trainable=task.head,
        max_steps=task.strategy.finetune_steps,
    )
    return tuned
