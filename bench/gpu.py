"""GPU check of the barrier library with plain torch (no Flower, no Ray): one prepared script.

    python bench/gpu.py               # on a CUDA machine; well under 3 minutes on one H100
    python bench/gpu.py --cpu-smoke   # tiny sizes on the CPU, to check the script itself

For a torchvision ResNet-18 (CIFAR stem: 3×3 conv1 stride 1, no max-pool) and an FMNIST-sized CNN, both
with BatchNorm, on random data resident on the device:

1. evaluation throughput (img/s): naive fp32 batch 256 (``load_state_dict``, ``.item()`` per batch) vs
   ``Evaluator`` exact fp32 batch 2048 vs ``Evaluator`` bf16 + channels_last batch 2048;
2. layer-wise barriers: the naive reference (endpoints re-evaluated for every block) vs the library in
   exact fp32 and in bf16: seconds, and the bf16 and naive barriers against the exact fp32 ones;
3. host syncs (``torch.cuda.set_sync_debug_mode``): none while an evaluation is queued, one per analysis;
4. one pass each of full / cumulative / random-control barriers, BatchNorm reset and the landscape
   metrics on the fast path: finite values, cumulative k = n equal to the full barrier.

Prints a compact summary, writes ``$OUT/gpu_bench.json`` when ``OUT`` is set; exit status 1 when a check
fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing fedlayer

from barrier_speed import FmnistCNN, naive_evaluate, naive_layer_barriers, two_states

from fedlayer.analysis import (
    BarrierRow,
    EvalData,
    Evaluator,
    barrier_analysis,
    landscape,
    layer_barriers,
)
from fedlayer.models import model_blocks


@dataclass(frozen=True)
class Sizes:
    throughput: int  # samples per throughput evaluation
    barrier: int  # samples for the barrier analyses
    repeats: int
    resnet_image: int  # ResNet-18 input height = width
    hessian: int  # samples for the landscape's Hessian-vector products


GPU = Sizes(throughput=32768, barrier=4096, repeats=3, resnet_image=32, hessian=512)
SMOKE = Sizes(throughput=64, barrier=24, repeats=1, resnet_image=8, hessian=8)


def resnet18_cifar() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()  # type: ignore[assignment]
    return model


def models(sizes: Sizes) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    side = sizes.resnet_image
    return {"resnet18": (resnet18_cifar, (3, side, side)), "cnn": (lambda: FmnistCNN(width=32), (1, 28, 28))}


def random_data(shape: tuple[int, ...], n: int, device: torch.device) -> EvalData:
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((n, *shape), generator=generator, device=device)
    return EvalData(x, torch.randint(0, 10, (n,), generator=generator, device=device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(
    fn: Callable[[], Any], device: torch.device, repeats: int = 1, warmup: bool = False
) -> tuple[float, Any]:
    """Best of ``repeats`` timed runs (after one untimed run with ``warmup``), and the last result."""
    result, best = fn() if warmup else None, math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def throughput(model: nn.Module, state: dict[str, Tensor], data: EvalData, sizes: Sizes) -> dict[str, float]:
    """img/s of one evaluation: naive fp32 batch 256, exact fp32 batch 2048, bf16 + channels_last 2048."""
    naive_model = copy.deepcopy(model).to(data.x.device)
    exact = Evaluator(model, data, exact=True, batch_size=2048)
    fast = Evaluator(model, data, batch_size=2048)
    runs: dict[str, Callable[[], Any]] = {
        "naive_fp32_b256": lambda: naive_evaluate(naive_model, state, data.x, data.y),
        "exact_fp32_b2048": lambda: exact.evaluate(state),
        "fast_b2048": lambda: fast.evaluate(state),
    }
    return {
        name: len(data) / seconds(fn, data.x.device, sizes.repeats, warmup=True)[0]
        for name, fn in runs.items()
    }


def barrier_values(rows: list[BarrierRow]) -> dict[tuple[str, str], float]:
    return {(row.base, row.block): row.barrier for row in rows}


def max_gap(x: dict[tuple[str, str], float], y: dict[tuple[str, str], float]) -> float:
    return max(abs(x[key] - y[key]) for key in x)


def sync_sites(fn: Callable[[], Any], device: torch.device) -> list[str]:
    """``file:line: message`` of each synchronizing CUDA call made by ``fn`` (empty off CUDA)."""
    if device.type != "cuda":
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [
        f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0]}"
        for w in caught
        if "called a synchronizing CUDA operation" in str(w.message)  # not the prototype notice
    ]


def finite(rows: list[Any], columns: tuple[str, ...]) -> bool:
    return all(math.isfinite(getattr(row, column)) for row in rows for column in columns)


def bench_model(name: str, device: torch.device, sizes: Sizes, tol: float) -> dict[str, Any]:
    build, shape = models(sizes)[name]
    model = build()
    data = random_data(shape, max(sizes.throughput, sizes.barrier), device)
    sd_a, sd_b = two_states(model, data.x)
    blocks = model_blocks(model)
    result: dict[str, Any] = {
        "blocks": len(blocks),
        "img_per_s": throughput(model, sd_a, data.head(sizes.throughput), sizes),
    }

    small = data.head(sizes.barrier)
    exact = Evaluator(model, small, exact=True, batch_size=2048)
    fast = Evaluator(model, small)
    # kernels are warm from the throughput runs; the slow sides run once
    naive_s, naive = seconds(
        lambda: naive_layer_barriers(model, sd_a, sd_b, blocks, small.x, small.y), device
    )
    exact_s, exact_rows = seconds(lambda: layer_barriers(exact, sd_a, sd_b, blocks), device)
    fast_s, fast_rows = seconds(lambda: layer_barriers(fast, sd_a, sd_b, blocks), device, sizes.repeats)
    reference = barrier_values(exact_rows)
    scale = max(abs(value) for value in reference.values())
    result["layer_barriers"] = {
        "samples": len(small),
        "naive_s": naive_s,
        "exact_s": exact_s,
        "fast_s": fast_s,
        "max_barrier": scale,
        "max_gap_fast_vs_exact": max_gap(barrier_values(fast_rows), reference),
        "max_gap_naive_vs_exact": max_gap({k: v[0] for k, v in naive.items()}, reference),
        "tolerance": tol * max(1.0, scale),
    }
    result["syncs"] = {  # each a list of "file:line: message"; evaluate_tensor twice to tell one-offs apart
        "evaluate_tensor": sync_sites(lambda: fast.evaluate_tensor(sd_a), device),
        "evaluate_tensor_again": sync_sites(lambda: fast.evaluate_tensor(sd_b), device),
        "layer_barriers": sync_sites(lambda: layer_barriers(fast, sd_a, sd_b, blocks), device),
    }
    result["extras"] = extras(model, small, sd_a, sd_b, blocks, device, sizes)
    return result


def extras(
    model: nn.Module,
    data: EvalData,
    sd_a: dict[str, Tensor],
    sd_b: dict[str, Tensor],
    blocks: dict[str, list[str]],
    device: torch.device,
    sizes: Sizes,
) -> dict[str, Any]:
    """Full / cumulative / random / BN reset / landscape on the fast path: seconds and sanity checks."""
    fast = Evaluator(model, data)
    analysis_s, rows = seconds(
        lambda: barrier_analysis(
            fast, sd_a, sd_b, blocks, cumulative=("shallow", "minimal"), random_control=True, seed=0
        ),
        device,
    )
    full = next(row.loss for row in rows if row.kind == "full")
    last = [row.loss for row in rows if row.kind == "cumulative" and row.k == len(blocks)]
    reset = Evaluator(model, data, bn="reset", bn_samples=min(2048, len(data)))
    reset_s, reset_rows = seconds(lambda: layer_barriers(reset, sd_a, sd_b, blocks), device)
    land_s, land = seconds(
        lambda: landscape(fast, sd_a, sd_b, blocks, origin=sd_a, samples=sizes.hessian), device
    )
    columns = ("loss", "barrier")
    return {
        "analysis_rows": len(rows),
        "analysis_s": analysis_s,
        "cumulative_equals_full": all(abs(loss - full) <= 1e-4 for loss in last) and len(last) == 4,
        "bn_reset_s": reset_s,
        "landscape_s": land_s,
        "landscape_rows": len(land),
        "finite": finite(rows, columns) and finite(reset_rows, columns) and finite(land, ("curvature",)),
    }


def checks(name: str, result: dict[str, Any], device: torch.device) -> dict[str, bool]:
    layer = result["layer_barriers"]
    found = {
        f"{name}: bf16 barriers within tolerance of exact fp32": layer["max_gap_fast_vs_exact"]
        <= layer["tolerance"],
        f"{name}: naive barriers within tolerance of exact fp32": layer["max_gap_naive_vs_exact"]
        <= layer["tolerance"],
        f"{name}: cumulative k = n equals full": result["extras"]["cumulative_equals_full"],
        f"{name}: all values finite": result["extras"]["finite"],
    }
    if device.type == "cuda":
        syncs = result["syncs"]
        queued = syncs["evaluate_tensor"] + syncs["evaluate_tensor_again"]
        found[f"{name}: no host sync while queuing an evaluation"] = not queued
        found[f"{name}: one host sync per layer_barriers call"] = len(syncs["layer_barriers"]) == 1
    return found


def summary_lines(name: str, result: dict[str, Any]) -> list[str]:
    speed, layer, extra = result["img_per_s"], result["layer_barriers"], result["extras"]
    return [
        f"{name}: eval img/s  naive b256 (torch defaults: TF32 convs) {speed['naive_fp32_b256']:,.0f}"
        " | exact fp32 b2048 "
        f"{speed['exact_fp32_b2048']:,.0f} | bf16+cl b2048 {speed['fast_b2048']:,.0f} "
        f"(x{speed['fast_b2048'] / speed['naive_fp32_b256']:.1f})",
        f"{name}: layer barriers ({result['blocks']} blocks, n={layer['samples']})  "
        f"naive {layer['naive_s']:.2f}s | exact {layer['exact_s']:.2f}s | fast {layer['fast_s']:.2f}s "
        f"(x{layer['naive_s'] / layer['fast_s']:.1f}); max|fast-exact| {layer['max_gap_fast_vs_exact']:.2e}, "
        f"max|naive-exact| {layer['max_gap_naive_vs_exact']:.2e} "
        f"(tol {layer['tolerance']:.2e}, max|B| {layer['max_barrier']:.2e})",
        f"{name}: syncs {dict((k, len(v)) for k, v in result['syncs'].items())} {result['syncs']}; "
        f"analysis {extra['analysis_rows']} rows {extra['analysis_s']:.2f}s, "
        f"bn reset {extra['bn_reset_s']:.2f}s, "
        f"landscape {extra['landscape_rows']} rows {extra['landscape_s']:.2f}s",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--tol", type=float, default=0.02, help="barrier tolerance, times max(1, max|B|)")
    parser.add_argument("--models", default="resnet18,cnn")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("CUDA is not available (use --cpu-smoke to check the script on the CPU)")
        return 1
    device, sizes = (torch.device("cpu"), SMOKE) if args.cpu_smoke else (torch.device("cuda"), GPU)
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny tensors: more threads only contend
    start = time.perf_counter()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "sizes": sizes.__dict__,
    }
    passed: dict[str, bool] = {}
    for name in args.models.split(","):
        report[name] = bench_model(name, device, sizes, args.tol)
        passed.update(checks(name, report[name], device))
        print("\n".join(summary_lines(name, report[name])), flush=True)
    report["checks"], report["seconds"] = passed, time.perf_counter() - start
    for check, ok in passed.items():
        print(f"{'PASS' if ok else 'FAIL'}  {check}")
    print(f"{report['device']}, torch {torch.__version__}: {time.perf_counter() - start:.0f}s in all")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_bench.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
