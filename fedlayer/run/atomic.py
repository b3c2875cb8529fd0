"""Writing a file whole or not at all; every file a run or a command writes goes through here.

:func:`write_atomic` (whole files: a temporary file renamed over the target) and :func:`append_text` (row
files) leave nothing half-written when a write fails: the temporary file is removed, an appended row is cut
off again. A full disk (``ENOSPC``, or a quota: ``EDQUOT``) becomes :class:`NoSpaceLeft`, one line naming the
file and the device. Only the standard library is imported up front (psutil and torch when needed), so that
every module, the command line's first one included, can write through it.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
from pathlib import Path
from typing import Any


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
