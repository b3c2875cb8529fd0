"""FedCAC's server part (Wu et al., ICCV 2023): one customized model per client for its critical parameters.

Each client marks its critical parameters after training (``fedlayer/client/recipes.py``: ``critical_mask``)
and sends the mask beside its model. The server measures how far two clients' masks overlap,

    overlap(i, j) = 1 - sum |m_i - m_j| / (2 sum m_i),

and lets client i collaborate with the clients whose overlap with it reaches a threshold that rises from the
mean overlap to the maximum over ``beta`` rounds,

    threshold(r) = mean + (r + 1) / beta * (max - mean)      (r: the round just trained, 1-based),

the mean and the maximum taken over all ordered pairs i != j. Client i's customized model is the plain
average of its own trained model and its collaborators'; the client takes its critical parameters from it and
the others from the global (FedAvg) model. The clients of a round are the ones compared: a client that did not
train in the round gets no customized model the next (PFLlib compares every client's latest model; with every
client training each round the two agree).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

Tensors = Mapping[str, torch.Tensor]


def overlap_matrix(masks: list[torch.Tensor]) -> torch.Tensor:
    """Overlap of every ordered pair of flat 0/1 masks (float64; the diagonal is 0 and unused)."""
    stacked = torch.stack([m.bool() for m in masks])
    differing = torch.stack([(stacked ^ row).sum(dim=1) for row in stacked]).double()  # sum |m_i - m_j|
    overlap = 1 - differing / (2 * stacked.sum(dim=1, keepdim=True).double()).clamp_min(1e-12)
    return overlap.fill_diagonal_(0.0)


def collaboration_threshold(overlap: torch.Tensor, server_round: int, beta: int) -> float:
    """The overlap a pair needs to collaborate after round ``server_round`` (see the module's docstring)."""
    n = overlap.shape[0]
    off_diagonal = overlap[~torch.eye(n, dtype=torch.bool)]
    mean, top = float(off_diagonal.mean()), float(off_diagonal.max())
    return mean + (server_round + 1) / beta * (top - mean)


def collaborators(overlap: torch.Tensor, threshold: float) -> list[list[int]]:
    """Per client (row), the indices it averages with: itself, then every j with overlap >= threshold."""
    n = overlap.shape[0]
    return [[i] + [j for j in range(n) if j != i and float(overlap[i, j]) >= threshold] for i in range(n)]


def customized_models(models: list[Tensors], groups: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """The plain mean of the models of each group, summed in the group's order (its own model first)."""
    return [{k: _mean([models[j][k] for j in group]) for k in models[0]} for group in groups]


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total / len(tensors)


class CriticalCollaboration:
    """The customized model of each client of the last round, by partition id; checkpointed with the run."""

    def __init__(self, beta: int) -> None:
        self.beta = beta
        self.customized: dict[int, ArrayRecord] = {}

    def observe(self, server_round: int, uploads: Mapping[int, tuple[Tensors, Tensors]]) -> None:
        """After round ``server_round``'s training: ``uploads`` maps partition id -> (model, critical mask),
        both by parameter name."""
        partitions = sorted(uploads)
        if len(partitions) < 2:  # nobody to collaborate with: the global model is the customized one
            self.customized = {}
            return
        keys = sorted(uploads[partitions[0]][1])  # the parameters the masks cover
        masks = [torch.cat([uploads[p][1][k].flatten() for k in keys]) for p in partitions]
        overlap = overlap_matrix(masks)
        groups = collaborators(overlap, collaboration_threshold(overlap, server_round, self.beta))
        averaged = customized_models([{k: uploads[p][0][k] for k in keys} for p in partitions], groups)
        self.customized = {
            p: ArrayRecord({k: Array(v.numpy()) for k, v in model.items()})
            for p, model in zip(partitions, averaged, strict=True)
        }

    def downlink(self, partition_id: int) -> ArrayRecord | None:
        return self.customized.get(partition_id)

    def state(self) -> dict[str, Any]:
        return {
            "customized": {
                str(p): {k: torch.from_numpy(np.array(a.numpy())) for k, a in record.items()}
                for p, record in self.customized.items()
            }
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.customized = {
            int(p): ArrayRecord({k: Array(v.numpy()) for k, v in tensors.items()})
            for p, tensors in state.get("customized", {}).items()
        }
