"""FedCAC's rules on small hand-worked cases: critical masks, overlaps, the threshold, customized models, the
client's assembly; the server state's round trip (a checkpoint holds it)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedlayer.client.recipes import LocalTask, cac_customized, critical_mask, fedcac
from fedlayer.config import load_config
from fedlayer.contract import CRITICAL
from fedlayer.run.rundir import RunDir
from fedlayer.server.checkpoint import load_checkpoint, restore, save_checkpoint
from strategies import PartialStrategy
from strategies.fedcac import (
    CriticalCollaboration,
    collaboration_threshold,
    collaborators,
    customized_models,
    overlap_matrix,
)


def test_critical_mask_keeps_the_largest_share_of_update_times_value() -> None:
    before = {"w": torch.ones(4)}
    after = {"w": torch.tensor([2.0, 1.0, 3.0, 0.5])}  # |Δ ⊙ θ| = 2, 0, 6, 0.25
    assert critical_mask(before, after, 0.5)["w"].tolist() == [True, False, True, False]
    assert critical_mask(before, after, 0.25)["w"].tolist() == [False, False, True, False]
    assert not critical_mask(before, after, 0.1)["w"].any()  # a share below one element: none


def test_a_zero_threshold_falls_back_to_the_least_nonzero_sensitivity() -> None:
    before = {"w": torch.ones(4)}
    after = {"w": torch.tensor([1.0, 1.0, 1.0, 2.0])}  # |Δ ⊙ θ| = 0, 0, 0, 2: the top half's last is 0
    assert critical_mask(before, after, 0.5)["w"].tolist() == [False, False, False, True]


def test_overlap_threshold_and_collaborators() -> None:
    masks = [torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]), torch.tensor([1, 1, 0, 0])]
    overlap = overlap_matrix(masks)
    # 1 - sum|m_i - m_j| / (2 sum m_i): pairs (0, 1) and (1, 2) differ in 2 of 2 + 2 ones, (0, 2) in none
    assert overlap.tolist() == [[0.0, 0.5, 1.0], [0.5, 0.0, 0.5], [1.0, 0.5, 0.0]]
    mean = (0.5 + 1.0 + 0.5 + 0.5 + 1.0 + 0.5) / 6
    assert collaboration_threshold(overlap, 1, beta=4) == pytest.approx(mean + 2 / 4 * (1.0 - mean))
    assert collaboration_threshold(overlap, 1, beta=2) == pytest.approx(1.0)  # round + 1 = beta: the maximum
    assert collaborators(overlap, 1.0) == [[0, 2], [1], [2, 0]]
    assert collaborators(overlap, 0.5) == [[0, 1, 2], [1, 0, 2], [2, 0, 1]]


def test_customized_models_are_the_plain_means_of_the_groups() -> None:
    models = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([6.0])}]
    found = customized_models(models, [[0, 2], [1], [2, 0, 1]])
    assert [m["w"].item() for m in found] == [3.5, 2.0, 3.0]


def test_the_server_sends_each_client_its_group_mean_and_keeps_it_across_a_checkpoint() -> None:
    uploads = {
        7: ({"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([True, False])}),
        3: ({"w": torch.tensor([3.0, 3.0])}, {"w": torch.tensor([True, False])}),
        5: ({"w": torch.tensor([9.0, 9.0])}, {"w": ~torch.tensor([True, False])}),
    }
    server = CriticalCollaboration(beta=2)  # after round 1 (r + 1 = beta) the threshold is the maximum, 1
    server.observe(1, uploads)
    received = {p: server.downlink(p) for p in (3, 5, 7)}
    assert {p: r["w"].numpy().tolist() for p, r in received.items() if r} == {
        3: [2.0, 2.0],
        5: [9.0, 9.0],
        7: [2.0, 2.0],
    }
    assert server.downlink(4) is None  # did not train this round
    again = CriticalCollaboration(beta=2)
    again.load_state(copy.deepcopy(server.state()))
    assert {p: r["w"].numpy().tolist() for p, r in again.customized.items()} == {
        p: r["w"].numpy().tolist() for p, r in server.customized.items()
    }
    alone = CriticalCollaboration(beta=1)
    alone.observe(1, {3: uploads[3]})
    assert alone.downlink(3) is None  # nobody to collaborate with: the global model serves


def tiny_task(downlink: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> LocalTask:
    cfg = load_config(None, ["strategy.name='fedcac'", "train.batch_size=4", "strategy.cac_tau=0.5"])
    model = nn.Sequential(nn.Linear(3, 2))
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    return LocalTask(
        model,
        x,
        y,
        cfg.train,
        cfg.strategy,
        torch.device("cpu"),
        torch.Generator().manual_seed(0),
        set(),
        {"0.weight", "0.bias"},
        state,
        downlink,
    )


def test_the_client_takes_its_critical_parameters_from_the_customized_model() -> None:
    task = tiny_task({}, {})
    global_ = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
    customized = {k: v + 10 for k, v in global_.items()}
    mask = {
        "0.weight": torch.tensor([[True, False, True], [False, False, True]]),
        "0.bias": torch.tensor([False, True]),
    }
    task = tiny_task(customized, {f"critical.{k}": v for k, v in mask.items()})
    task.model.load_state_dict(global_)
    evaluated = cac_customized(task, False)
    for key, value in evaluated.state_dict().items():
        assert torch.equal(value, torch.where(mask[key], customized[key], global_[key]))
    assert all(torch.equal(v, global_[k]) for k, v in task.model.state_dict().items()), "a copy is evaluated"
    fedcac(task)
    sent = task.upload[CRITICAL]
    assert set(sent) == {"0.weight", "0.bias"} and all(m.dtype == torch.bool for m in sent.values())
    assert [int(m.sum()) for m in sent.values()] == [3, 1]  # half of each tensor (no ties here)
    assert all(torch.equal(task.entry("critical")[k], sent[k]) for k in sent)
    assert cac_customized(task, False) is task.model, "after training the trained model is evaluated"


def test_a_checkpoint_keeps_the_customized_models(tmp_path: Path) -> None:
    """A resumed FedCAC run sends the customized models the killed one would have sent."""
    uploads = {p: ({"w": torch.full((2,), float(p))}, {"w": torch.tensor([True, p > 1])}) for p in range(3)}

    def strategy() -> PartialStrategy:
        return PartialStrategy(FedAvg(), ["w"], downlink=CriticalCollaboration(beta=170))

    before = strategy()
    assert before.downlink is not None
    before.downlink.observe(1, uploads)
    run = RunDir.create(tmp_path / "run")
    save_checkpoint(run, 1, ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}), before)
    after = strategy()
    restore(run, load_checkpoint(run), after)
    assert after.downlink is not None and after.round_offset == 1
    for p in range(3):
        sent, kept = before.downlink.downlink(p), after.downlink.downlink(p)
        assert sent is not None and kept is not None
        assert np.array_equal(sent["w"].numpy(), kept["w"].numpy())
