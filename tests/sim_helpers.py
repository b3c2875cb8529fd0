"""Helpers for the tests that run real simulations through the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("round_seconds",)  # wall-clock fields: the only ones allowed to differ between identical runs


def cli_args(data_root: Path, out: Path | None, *overrides: str) -> list[str]:
    """A 4-client, 4-round run on the tiny dataset; half the clients train each round (seeded sampling)."""
    sets = [
        f"data.root='{data_root}'",
        "data.min_partition_size=5",
        "federation.clients=4",
        "federation.rounds=4",
        "federation.fraction_train=0.5",
        "train.batch_size=16",
        "strategy.name='fedper'",
        *overrides,
    ]
    args = [sys.executable, "-m", "fedlayer.cli", "run", "experiments/default.toml"]
    args += ["--out", str(out)] if out is not None else []
    return args + [a for s in sets for a in ("--set", s)]


def env() -> dict[str, str]:
    return os.environ | {"FLWR_TELEMETRY_ENABLED": "0"}


def run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def metrics(out: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_model(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
