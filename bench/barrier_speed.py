"""Layer-wise barriers: a naive reference vs ``fedlayer.analysis``, side by side in one process.

Naive: for every block and base, evaluate θ_A, θ_B and the midpoint again, each by ``load_state_dict``
into the model, batch 256, a ``.item()`` per batch. Fast: ``Evaluator`` + ``layer_barriers``: endpoints
once, ``functional_call``, sums on the device, one host sync; on CUDA bf16 autocast + channels_last +
batch 2048. Same models and data on both sides; asserts the barriers agree; prints the speedup ratio.
CPU runs use ``--threads`` intra-op threads (default 1: tiny models gain nothing from more, and a shared
machine makes multi-threaded timings noisy).

    .venv/bin/python bench/barrier_speed.py [--samples 2048] [--repeats 3] [--device cpu|cuda|all]
                                            [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing fedlayer

from fedlayer.analysis import Evaluator, layer_barriers
from fedlayer.models import model_blocks

Barriers = dict[tuple[str, str], tuple[float, float]]


class FmnistCNN(nn.Module):
    """A small FMNIST-sized CNN with BatchNorm (1×28×28 -> 10)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width)
        self.fc1, self.fc2 = nn.Linear(2 * width * 7 * 7, 64), nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 256), nn.Linear(256, 128), nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def two_states(model: nn.Module, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Two differently initialized state dicts with data-dependent BatchNorm statistics."""
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        other = copy.deepcopy(model).to(x.device)
        for module in other.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        with torch.no_grad():
            other.train()(x[:512])
        states.append({k: v.detach().clone() for k, v in other.state_dict().items()})
    return states[0], states[1]


def naive_evaluate(
    model: nn.Module, state: Mapping[str, Tensor], x: Tensor, y: Tensor
) -> tuple[float, float]:
    model.load_state_dict(state)
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), 256):
            logits = model(x[start : start + 256])
            loss += F.cross_entropy(logits, y[start : start + 256], reduction="sum").item()
            correct += int((logits.argmax(1) == y[start : start + 256]).sum().item())
    return loss / len(y), 1 - correct / len(y)


def naive_layer_barriers(
    model: nn.Module,
    sd_a: dict[str, Tensor],
    sd_b: dict[str, Tensor],
    blocks: Mapping[str, Sequence[str]],
    x: Tensor,
    y: Tensor,
) -> Barriers:
    """(base, block) -> midpoint (barrier, error barrier), every quantity evaluated afresh."""
    model = copy.deepcopy(model).to(x.device)
    result = {}
    for base_name, base in (("a", sd_a), ("b", sd_b)):
        for block, keys in blocks.items():
            (loss_a, error_a), (loss_b, error_b) = (
                naive_evaluate(model, sd_a, x, y),
                naive_evaluate(model, sd_b, x, y),
            )
            mid = {
                k: 0.5 * sd_a[k] + 0.5 * sd_b[k] if k in keys and v.is_floating_point() else v
                for k, v in base.items()
            }
            loss, error = naive_evaluate(model, mid, x, y)
            result[base_name, block] = (loss - (loss_a + loss_b) / 2, error - (error_a + error_b) / 2)
    return result


def fast_layer_barriers(
    evaluator: Evaluator,
    sd_a: dict[str, Tensor],
    sd_b: dict[str, Tensor],
    blocks: Mapping[str, Sequence[str]],
) -> Barriers:
    rows = layer_barriers(evaluator, sd_a, sd_b, blocks)
    return {(row.base, row.block): (row.barrier, row.error_barrier) for row in rows}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Barriers], device: torch.device, repeats: int) -> tuple[float, Barriers]:
    """Median seconds over ``repeats`` runs after one warm-up run, and the last result."""
    result, times = fn(), []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def max_difference(naive: Barriers, fast: Barriers) -> tuple[float, float]:
    assert naive.keys() == fast.keys()
    loss = max(abs(naive[k][0] - fast[k][0]) for k in naive)
    error = max(abs(naive[k][1] - fast[k][1]) for k in naive)
    return loss, error


def compare(name: str, model: nn.Module, x: Tensor, y: Tensor, repeats: int) -> dict[str, float]:
    """Time both implementations on the same inputs; assert they agree; return the summary."""
    device = x.device
    sd_a, sd_b = two_states(model, x)
    blocks = model_blocks(model)
    evaluator = Evaluator(model, (x, y))  # its defaults: batch 2048 on CUDA, 256 on CPU
    naive_s, naive = timed(lambda: naive_layer_barriers(model, sd_a, sd_b, blocks, x, y), device, repeats)
    fast_s, fast = timed(lambda: fast_layer_barriers(evaluator, sd_a, sd_b, blocks), device, repeats)
    loss_diff, error_diff = max_difference(naive, fast)
    # CPU: both fp32 (only summation order differs); CUDA: fp32 (TF32 convs) vs bf16 autocast
    loss_tol, error_tol = (1e-4, 3 / len(y)) if device.type == "cpu" else (5e-2, 2e-2)
    assert loss_diff <= loss_tol and error_diff <= error_tol, (name, loss_diff, error_diff)
    return {
        "blocks": len(blocks),
        "samples": len(y),
        "naive_s": naive_s,
        "fast_s": fast_s,
        "speedup": naive_s / fast_s,
        "max_barrier_diff": loss_diff,
        "max_error_barrier_diff": error_diff,
    }


def run(device: torch.device, samples: int, repeats: int) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 10, (samples,), generator=generator).to(device)
    return {
        name: compare(name, model, x, y, repeats) for name, model in (("cnn", FmnistCNN()), ("mlp", MLP()))
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for name in devices:
        if name == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped")
            continue
        for model, summary in run(torch.device(name), args.samples, args.repeats).items():
            print(
                f"{name:4s} {model:4s} blocks={summary['blocks']:3d} n={summary['samples']}  "
                f"naive {summary['naive_s']:.3f}s  fast {summary['fast_s']:.3f}s  "
                f"speedup x{summary['speedup']:.1f}  max|Δbarrier| {summary['max_barrier_diff']:.1e}"
            )


if __name__ == "__main__":
    main()
