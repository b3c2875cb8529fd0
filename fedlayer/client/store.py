"""The clients' personal layers on disk, so that neither RAM nor a process restart loses them.

One store serves simulation and SuperNodes; it holds ``<root>/partition-<id>/round-<r>.pt``, a client's
personal state after training in round r (tensors only: loads with ``torch.load(weights_only=True)``): its
personal keys and, under ``state.<name>.<key>``, the client state its algorithm's recipe keeps (Ditto's
personal model, FedALA's weights).
In simulation the root is the run directory's ``clients/`` (the clients share the server's file system);
on a SuperNode it is a node-local folder per run, so a restarted SuperNode finds its layers again.

Per partition the store keeps what the next instruction and a resume need: the newest state, and the one
before it until the server has checkpointed the round of the newest (a resume from the previous checkpoint
loads the older one). Clients drop older files when they save; the server prunes after each checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from fedlayer.run.atomic import torch_bytes, write_atomic

_ROUND_FILE = re.compile(r"round-(\d+)\.pt$")
STATE_PREFIX = "state."  # keys of a recipe's client state in a saved file: "state.<name>.<key>"


def split_state(saved: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A saved file's (personal model keys, client state keyed ``<name>.<key>``)."""
    personal = {k: v for k, v in saved.items() if not k.startswith(STATE_PREFIX)}
    state = {k[len(STATE_PREFIX) :]: v for k, v in saved.items() if k.startswith(STATE_PREFIX)}
    return personal, state


def join_state(personal: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One file's content: personal model keys, then the client state under :data:`STATE_PREFIX`."""
    return personal | {STATE_PREFIX + k: v.detach().cpu() for k, v in state.items()}


class PersonalStore:
    """Personal states of clients under ``root`` (created on the first save).

    Parameters
    ----------
    root : str | Path
        Folder holding one ``partition-<id>`` folder per client.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def load(self, partition_id: int, server_round: int) -> dict[str, torch.Tensor] | None:
        """The newest state of a round <= ``server_round``, or ``None`` (the client never trained)."""
        files = [path for r, path in self._files(partition_id) if r <= server_round]
        return torch.load(files[-1], weights_only=True) if files else None

    def save(self, partition_id: int, server_round: int, state: dict[str, torch.Tensor]) -> None:
        """Write the state after training in ``server_round`` atomically; keep only the newest older one.

        Round r is trained only after the server checkpointed round r - 1, which needs at most the newest
        state of a round < r: anything older is dead.
        """
        folder = self._folder(partition_id)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(
                f"personal layers cannot be written to {folder.resolve()} ({err.strerror}): "
                "give the SuperNode a writable node config state-dir"
            ) from err
        path = folder / f"round-{server_round:06d}.pt"
        write_atomic(path, torch_bytes(state))
        older = [p for r, p in self._files(partition_id) if r < server_round]
        _unlink(older[:-1])

    def prune(self, partition_ids: Iterable[int], server_round: int) -> None:
        """After the checkpoint of ``server_round``: per partition only the newest state <= it is needed."""
        for pid in partition_ids:
            _unlink([p for r, p in self._files(pid) if r <= server_round][:-1])

    def drop_after(self, server_round: int) -> None:
        """Resuming from the checkpoint of ``server_round``: states written after it never happened."""
        for folder in self._partition_folders():
            _unlink([p for r, p in _round_files(folder) if r > server_round])

    def disk_bytes(self) -> int:
        """Bytes used by every stored state."""
        return sum(p.stat().st_size for folder in self._partition_folders() for _, p in _round_files(folder))

    def _folder(self, partition_id: int) -> Path:
        return self.root / f"partition-{partition_id}"

    def _files(self, partition_id: int) -> list[tuple[int, Path]]:
        return _round_files(self._folder(partition_id))

    def _partition_folders(self) -> list[Path]:
        return sorted(self.root.glob("partition-*")) if self.root.exists() else []


def _round_files(folder: Path) -> list[tuple[int, Path]]:
    """(round, path) of the states in ``folder``, oldest first."""
    if not folder.exists():
        return []
    found = [(m, p) for p in folder.glob("round-*.pt") if (m := _ROUND_FILE.search(p.name))]
    return sorted((int(m.group(1)), p) for m, p in found)


def _unlink(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
