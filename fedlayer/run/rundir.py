"""A run directory: created once, written atomically (file names: :mod:`fedlayer.run.files`; writing:
:mod:`fedlayer.run.atomic`; reading: :mod:`fedlayer.run.readers`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedlayer.config import ConfigError
from fedlayer.run.atomic import append_text, torch_bytes, write_atomic
from fedlayer.run.files import LOCK_FILE, METRICS, TENSORBOARD
from fedlayer.run.readers import read_jsonl


class RunDir:
    """A run's output folder; never silently overwritten."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, path: str | Path, *, overwrite: bool = False) -> RunDir:
        path = Path(path)
        if path.exists() and any(p.name != LOCK_FILE for p in path.iterdir()) and not overwrite:
            raise ConfigError(f"--out: run directory {str(path)!r} exists and is not empty; pass --overwrite")
        path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            (path / METRICS).unlink(missing_ok=True)
        return cls(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: Any) -> None:
        self._atomic_write(name, json.dumps(obj, indent=2, default=_jsonable) + "\n")

    def write_text(self, name: str, text: str) -> None:
        self._atomic_write(name, text)

    def append_jsonl(self, name: str, row: dict[str, Any]) -> None:
        append_text(self.file(name), json.dumps(row, default=_jsonable) + "\n")

    def read_jsonl(self, name: str = METRICS) -> list[dict[str, Any]]:
        return read_jsonl(self.file(name))

    def _atomic_write(self, name: str, text: str) -> None:
        write_atomic(self.file(name), text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def save_arrays(run: RunDir, name: str, arrays: ArrayRecord) -> None:
    """A state dict (torch.save of tensors only: loads with ``torch.load(weights_only=True)``)."""
    write_atomic(run.file(name), torch_bytes(arrays.to_torch_state_dict()))


class TensorBoardLog:
    """Per-round scalars (every numeric metric of the row) to ``RUN_DIR/tensorboard`` when enabled."""

    def __init__(self, run: RunDir, *, enabled: bool) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run.file(TENSORBOARD)))

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()

    def add(self, row: dict[str, Any]) -> None:
        if self.writer is None or row["round"] == 0:
            return
        for key, value in row.items():
            if key != "round" and isinstance(value, int | float):
                self.writer.add_scalar(key, value, row["round"])
        self.writer.flush()
