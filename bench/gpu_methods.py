"""GPU check of every algorithm's local training recipe (plain torch: no Flower, no Ray): one prepared script.

    python bench/gpu_methods.py               # on a CUDA machine; about a minute on one H100
    python bench/gpu_methods.py --cpu-smoke   # tiny sizes on the CPU, to check the script itself

For each algorithm of the registry, PFLlib's CNN (with batch norms) with the algorithm's extension trains
two local rounds (``train.epochs = 1``, batch 10, SGD lr 0.05) on a learnable synthetic task resident on the
device (labels = arg-max of a fixed random projection of the images), exactly as a client's recipe runs it
(:data:`fedlayer.client.recipes.RECIPES`). Reported per algorithm: batches/s (training batches over the
recipe's seconds; Ditto trains twice), the two rounds' training losses, the personalized and the global
view's accuracy after them, and how far a rerun with the same generator lands (CUDA kernels are not bitwise
deterministic). Checks: finite losses and weights, the loss falls from round 1 to round 2, an evaluation
repeated on the same weights gives the same numbers. Writes ``$OUT/gpu_methods.json``
when ``OUT`` is set; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any, cast

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# strategies/__init__ imports the Flower mechanism; a GPU machine may have torch but no flwr. The registry
# (strategies/algorithms.py) needs neither, so the package is entered without running its __init__.
_package = types.ModuleType("strategies")
_package.__path__ = [str(ROOT / "strategies")]
sys.modules.setdefault("strategies", _package)

from fedlayer.client.recipes import PERSONALIZATIONS, RECIPES, LocalTask  # noqa: E402
from fedlayer.config import StrategyConfig, TrainConfig  # noqa: E402
from fedlayer.layers import resolve  # noqa: E402
from fedlayer.models import build_model, extend, global_view, model_blocks, model_groups  # noqa: E402
from fedlayer.training import evaluate  # noqa: E402
from strategies.algorithms import ALGORITHMS  # noqa: E402


def learnable_data(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=gen)
    y = (x.flatten(1) @ torch.randn(784, 10, generator=gen)).argmax(1)
    return x.to(device), y.to(device)


def task_for(
    name: str, model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], seed: int
) -> LocalTask:
    cfg = StrategyConfig(name=cast(Any, name))
    algorithm = ALGORITHMS[name]
    blocks, params = model_blocks(model), {n for n, _ in model.named_parameters()}
    head = {k for block in model_groups(model)["head"] for k in blocks[block]} & params
    shared = set(resolve(algorithm.selector(cfg), model).shared_keys) & params
    train = TrainConfig(lr=0.05, momentum=0.0, batch_size=10, drop_last=True)
    generator = torch.Generator().manual_seed(seed)
    return LocalTask(model, *data, train, cfg, data[0].device, generator, head, shared)


def two_rounds(name: str, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[float], float, Any]:
    """Train rounds 1 and 2 (client state carried over); the losses, the seconds and the last task."""
    algorithm = ALGORITHMS[name]
    torch.manual_seed(0)
    cnn = build_model("pfllib_cnn", 10, 1, 28, norm="batch")  # every algorithm, FedBN too, on one model
    model = extend(cnn, algorithm.extension, StrategyConfig(name=cast(Any, name)))
    model = model.to(data[0].device)
    losses: list[float] = []
    seconds, state = 0.0, dict[str, torch.Tensor]()
    for round_ in (1, 2):
        task = task_for(name, model, data, seed=round_)
        task.state = state
        synchronize(data[0].device)
        start = time.perf_counter()
        losses.append(RECIPES[algorithm.recipe](task))
        synchronize(data[0].device)
        seconds += time.perf_counter() - start
        state = task.state
    return losses, seconds, task


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_algorithm(name: str, data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    losses, seconds, task = two_rounds(name, data)
    rerun = two_rounds(name, data)[2].model.state_dict()
    weights = task.model.state_dict()
    personalized = PERSONALIZATIONS[ALGORITHMS[name].personalization](task, True)
    device = data[0].device
    first, again = (evaluate(personalized, *data, device=device) for _ in range(2))
    generic = evaluate(global_view(copy.deepcopy(task.model)), *data, device=device)
    steps = 2 * (len(data[1]) // 10)
    return {
        "losses": losses,
        "batches_per_s": steps / seconds,
        "personalized_acc": first[1],
        "global_acc": generic[1],
        "rerun_max_abs_diff": max(
            float((weights[k].float() - rerun[k].float()).abs().max()) for k in weights if weights[k].numel()
        ),
        "checks": {
            "finite": all(torch.isfinite(v.float()).all() for v in weights.values())
            and all(loss == loss for loss in losses),
            "loss falls": losses[1] < losses[0],
            "evaluation repeats": first == again,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("CUDA is not available (use --cpu-smoke to check the script on the CPU)")
        return 1
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    data = learnable_data(400 if args.cpu_smoke else 4000, device)
    names = [name for name, algorithm in ALGORITHMS.items() if algorithm.recipe]
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    failed = []
    for name in names:
        try:
            result = check_algorithm(name, data)
        except Exception as err:  # one method's failure is reported, the others still run
            result = {"error": f"{type(err).__name__}: {err}", "checks": {"runs": False}}
        results[name] = result
        failed += [f"{name}: {check}" for check, passed in result["checks"].items() if not passed]
        print(name, json.dumps({k: v for k, v in result.items() if k != "checks"}), result["checks"])
    print("FAILED: " + "; ".join(failed) if failed else f"all {len(names)} algorithms pass")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_methods.json").write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
