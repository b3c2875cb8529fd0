"""Client recipes: what a client does locally in a round, and which model it evaluates as personalized.

An algorithm declaration (:mod:`strategies.algorithms`) names one entry of :data:`RECIPES` and one of
:data:`PERSONALIZATIONS`; this module is the one registry that resolves those names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedlayer.config import StrategyConfig, TrainConfig
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


RECIPES: dict[str, Callable[[LocalTask], float]] = {
    "sgd": sgd,
    "fedprox": fedprox,
    "fedrep": fedrep,
    "fedbabu": fedbabu,
}
PERSONALIZATIONS: dict[str, Callable[[LocalTask, bool], nn.Module]] = {"as_is": as_is, "finetune": finetune}


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
