"""A run directory: created once, written atomically (file names: :mod:`fedlayer.run.files`; reading:
:mod:`fedlayer.run.readers`).

Every file a run writes goes through :func:`write_atomic` (whole files: a temporary file renamed over the
target) or :func:`append_text` (row files). Both leave nothing half-written when a write fails: the
temporary file is removed, an appended row is cut off again. A full disk (``ENOSPC``, or a quota:
``EDQUOT``) becomes :class:`NoSpaceLeft`, one line naming the file and the device.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedlayer.config import ConfigError
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


class NoSpaceLeft(Exception):
    """A file could not be written because its file system is full (nothing half-written is left)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"cannot write {path}: no space left on {device_of(path)}")
        self.path = path


def device_of(path: Path) -> str:
    """The device a path is on, for an error: ``DEVICE (mounted at MOUNT, N MiB free)``."""
    import psutil

    path = path.resolve()
    mounts = [m for m in psutil.disk_partitions(all=True) if path.is_relative_to(m.mountpoint)]
    if not mounts:
        return "its device"
    mount = max(mounts, key=lambda m: len(m.mountpoint))
    free = shutil.disk_usage(mount.mountpoint).free / 2**20
    return f"{mount.device} (mounted at {mount.mountpoint}, {free:.1f} MiB free)"


def _failed_write(path: Path, err: OSError) -> Exception:
    return NoSpaceLeft(path) if err.errno in (errno.ENOSPC, errno.EDQUOT) else err


def write_atomic(path: Path, data: str | bytes) -> None:
    """``path`` with ``data``, whole or not at all (see the module docstring)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _failed_write(path, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_text(path: Path, text: str) -> None:
    """Append ``text`` (whole rows) to ``path``; on failure the file is cut back to its old size."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as fh:
            fh.write(text)
    except OSError as err:
        with open(path, "r+b") as fh:  # truncating needs no space
            fh.truncate(size)
        raise _failed_write(path, err) from None


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` in memory: written by :func:`write_atomic`, a full disk raises ``OSError``, which
    torch's own file writer turns into an unreadable ``RuntimeError``."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_figure(fig: Any, path: Path, dpi: int) -> Path:
    """A matplotlib figure as PNG at ``path`` (atomically)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_atomic(path, buffer.getvalue())
    return path


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
