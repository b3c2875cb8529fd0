"""A rich progress bar over rounds showing the latest metrics, and a warning line for every client fault
the round it happens (``client_fault_details`` of the round's row)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlayer.contract import without_partition

log = logging.getLogger(__name__)


class RoundProgress:
    """Context manager; ``update(row)`` is the server's per-round callback."""

    def __init__(self, rounds: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[metrics]}"),
        )
        self.task = self.progress.add_task("rounds", total=rounds, metrics="starting (Ray, data)...")

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.progress.stop()

    def update(self, row: dict[str, Any]) -> None:
        shown = {"global_acc": "global", "personalized_acc": "personal", "train_loss": "loss"}
        text = "  ".join(f"{label} {row[key]:.3f}" for key, label in shown.items() if key in row)
        self.progress.update(self.task, completed=row["round"], metrics=text)
        for line in fault_lines(row):
            log.warning(line)


def fault_lines(row: dict[str, Any]) -> list[str]:
    """One line per client fault of a round: partition, node and cause."""
    return [
        f"round {row['round']}: {_client(fault)} (node {fault['node']}) excluded: {_cause(fault)}"
        for fault in row.get("client_fault_details", [])
    ]


def fault_summary(rows: Sequence[dict[str, Any]]) -> str:
    """``2 of 2 rounds had faults: partition 1 (cause)`` (each client's first cause); "" for none."""
    faulty = [row for row in rows if row.get("client_fault_details")]
    causes: dict[str, str] = {}
    for row in faulty:
        for fault in row["client_fault_details"]:
            causes.setdefault(_client(fault), _cause(fault))
    listed = "; ".join(f"{client} ({cause})" for client, cause in causes.items())
    return f"{len(faulty)} of {len(rows)} rounds had faults: {listed}" if faulty else ""


def _client(fault: dict[str, Any]) -> str:
    return "an unknown partition" if fault["partition"] is None else f"partition {fault['partition']}"


def _cause(fault: dict[str, Any]) -> str:
    detail = without_partition(str(fault["detail"]))
    return detail if fault["reason"] == "error" else f"{fault['reason']}: {detail}"
