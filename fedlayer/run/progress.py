"""A rich progress bar over rounds showing the latest metrics."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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
