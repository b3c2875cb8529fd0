"""A Flower grid whose wait for replies can be interrupted (Ctrl-C, SIGTERM in ``fedlayer run``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class InterruptibleGrid(Grid):
    """Flower's grid, except that ``interrupt`` is called while it waits for replies and may raise to end
    the wait (Flower's own wait ends only when every reply is in)."""

    poll_seconds = 0.1

    def __init__(self, grid: Grid, interrupt: Callable[[], None]) -> None:
        self.grid, self.interrupt = grid, interrupt

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Any:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            self.interrupt()
            got = list(self.pull_messages(waiting))
            replies += got
            waiting -= {reply.metadata.reply_to_message_id for reply in got}
            if waiting:
                time.sleep(self.poll_seconds)
        self.interrupt()
        return replies
