"""Per-round checkpoints and resuming.

Every round the server writes ``checkpoint.pt`` atomically (temp file + rename): the global arrays, the
base strategy's server-side optimizer state (FedAvgM momentum, FedAdam/FedYogi/FedAdagrad moments), the
server's RNG states, the sharing policy's state (``lmc``: next round's shared set, the history), the text
of ``metrics.jsonl`` so far and the size of every other row file (analysis rows written so far). It holds
tensors and plain Python values only, so it loads with ``torch.load(path, weights_only=True)``.

Personal layers live on the clients. In simulation they keep them in the run directory's ``clients/``
folder (a :class:`fedlayer.client.store.PersonalStore`; the server passes the folder in the train and evaluate
config as ``state-dir``). After checkpointing round k the server drops the older states of the clients
that trained in round k; on resume it deletes states of rounds > k (written after the checkpoint).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedlayer.client.store import PersonalStore
from fedlayer.config import ConfigError
from fedlayer.contract import partition_of
from fedlayer.flower import STRATEGY_STATE
from fedlayer.run.atomic import torch_bytes, write_atomic
from fedlayer.run.files import CHECKPOINT, CLIENT_STATE, CONFIG_RESOLVED, METRICS
from fedlayer.run.rundir import RunDir
from strategies.mechanism import PartialStrategy, RoundObserver

FORMAT = 1

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass
class Checkpoint:
    """The state after ``round`` complete rounds."""

    round: int
    arrays: ArrayRecord
    strategy: dict[str, Any]
    rng: dict[str, Any]
    metrics: str
    row_files: dict[str, int]
    sharing: dict[str, Any]  # the sharing policy's state (lmc: shared set, history, costs)
    downlink: dict[str, Any]  # the per-client models' state (fedcac: the customized models)


def save_checkpoint(run: RunDir, server_round: int, arrays: ArrayRecord, strategy: PartialStrategy) -> None:
    """Write ``checkpoint.pt`` for ``server_round`` atomically."""
    payload = {
        "format": FORMAT,
        "round": server_round,
        "arrays": _tensors(arrays),
        "strategy": {
            name: _encode(getattr(strategy.base, name))
            for name in STRATEGY_STATE
            if hasattr(strategy.base, name)
        },
        "rng": _rng_state(),
        "sharing": strategy.sharing.state() if strategy.sharing is not None else {},
        "downlink": strategy.downlink.state() if strategy.downlink is not None else {},
        "metrics": run.file(METRICS).read_text() if run.file(METRICS).exists() else "",
        "row_files": {p.name: p.stat().st_size for p in _row_files(run)},
    }
    write_atomic(run.file(CHECKPOINT), torch_bytes(payload))


def load_checkpoint(run: RunDir) -> Checkpoint:
    """Read ``checkpoint.pt`` of ``run`` (``ConfigError`` naming ``--resume`` if there is none)."""
    path = run.file(CHECKPOINT)
    if not path.exists():
        raise ConfigError(f"--resume: {str(run.path)!r} has no {CHECKPOINT}; no round of it completed")
    try:
        raw = torch.load(path, weights_only=True)
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in raw["arrays"].items()})
        return Checkpoint(
            raw["round"],
            arrays,
            raw["strategy"],
            raw["rng"],
            raw["metrics"],
            raw["row_files"],
            raw.get("sharing", {}),
            raw.get("downlink", {}),
        )
    except Exception as err:  # torch raises EOFError, RuntimeError, UnpicklingError, ... for a damaged file
        raise ConfigError(
            f"--resume: {str(path)!r} is damaged ({type(err).__name__}: {_first_line(err)}), so the state "
            f"of the run's last round is gone and it cannot be resumed; start over with "
            f"`fedlayer run {run.file(CONFIG_RESOLVED)} --out NEW_DIR`"
        ) from err


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or ["empty file"])[0]


def restore(run: RunDir, ckpt: Checkpoint, strategy: PartialStrategy) -> None:
    """Put the run directory, the strategy and the RNGs back to the end of round ``ckpt.round``."""
    run.write_text(METRICS, ckpt.metrics)
    for path in _row_files(run):
        if path.name != METRICS:
            _truncate(path, ckpt.row_files.get(path.name, 0))  # rows written after the checkpoint
    for name, value in ckpt.strategy.items():
        setattr(strategy.base, name, _decode(value))
    _set_rng_state(ckpt.rng)
    if strategy.sharing is not None and ckpt.sharing:
        strategy.sharing.load_state(ckpt.sharing)
    if strategy.downlink is not None and ckpt.downlink:
        strategy.downlink.load_state(ckpt.downlink)
    strategy.round_offset = ckpt.round
    PersonalStore(run.file(CLIENT_STATE)).drop_after(ckpt.round)


class TrainedPartitions(RoundObserver):
    """The partitions whose train replies the current round aggregated."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def on_train_replies(self, server_round: int, replies: Sequence[Message]) -> None:
        self.ids = [pid for reply in replies if (pid := partition_of(reply, {})) is not None]


def checkpointing(evaluate_fn: EvaluateFn, run: RunDir, strategy: PartialStrategy) -> EvaluateFn:
    """``evaluate_fn`` (which writes the round's metrics row) followed by a checkpoint of that round.

    Flower calls it after every round with its own round numbers; a resumed run adds the rounds done.
    After the checkpoint the clients that trained in the round need only their newest personal state.
    """
    trained = TrainedPartitions()
    strategy.observers.append(trained)
    store = PersonalStore(run.file(CLIENT_STATE))

    def evaluate_and_checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and strategy.round_offset:
            return None  # the restored model was evaluated before the interruption
        done = server_round + strategy.round_offset
        result = evaluate_fn(done, arrays)
        if server_round > 0:
            save_checkpoint(run, done, arrays, strategy)
            store.prune(trained.ids, done)
        return result

    return evaluate_and_checkpoint


def _row_files(run: RunDir) -> list[Path]:
    """Append-only row files (metrics, analysis rows) of the run directory."""
    return sorted(p for ext in ("*.jsonl", "*.csv") for p in run.path.glob(ext) if p.is_file())


def _truncate(path: Path, size: int) -> None:
    if path.stat().st_size > size:
        with open(path, "r+b") as fh:
            fh.truncate(size)


def _tensors(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()}


def _encode(value: Any) -> dict[str, Any]:
    """Strategy state as tensors: ``None``, an ArrayRecord, or a dict / list of numpy arrays."""
    if value is None:
        return {"kind": "none"}
    if isinstance(value, ArrayRecord):
        return {"kind": "record", "items": _tensors(value)}
    if isinstance(value, dict):
        return {"kind": "dict", "items": {k: torch.from_numpy(np.array(v)) for k, v in value.items()}}
    if isinstance(value, list):
        return {"kind": "list", "items": [torch.from_numpy(np.array(v)) for v in value]}
    raise TypeError(f"cannot checkpoint strategy state of type {type(value).__name__}")


def _decode(state: dict[str, Any]) -> Any:
    kind = state["kind"]
    if kind == "none":
        return None
    if kind == "record":
        return ArrayRecord({k: Array(v.numpy()) for k, v in state["items"].items()})
    if kind == "dict":
        return {k: v.numpy() for k, v in state["items"].items()}
    return [v.numpy() for v in state["items"]]


def _rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    keys_t = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    return {
        "python": random.getstate(),
        "numpy": {"keys": keys_t, "pos": pos, "gauss": (has_gauss, gauss)},
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    has_gauss, gauss = numpy["gauss"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], has_gauss, gauss))
    torch.set_rng_state(state["torch"])
