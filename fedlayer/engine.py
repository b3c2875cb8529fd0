"""A workaround in Flower's simulation engine: rounds whose cost grew with the number of virtual clients.

flwr 1.42's engine hands instructions to its client workers from a thread that, every 0.1 s, asks the
in-memory LinkState for the next message of *every* registered node (``vce_api.add_messages_to_queue``),
and each such query scans every stored message. That is nodes x messages work ten times a second in the
process hosting the ServerApp, however few clients a round samples: at 10,000 clients that thread held the
GIL most of the time, and a round took 2.2x the 100-client round (bench/RESULTS.md, "Scale").
:func:`deliver_to_waiting_nodes` swaps in a loop that asks only the nodes an undelivered message is waiting
for, in the same order and with the same LinkState call: what each node receives, and in which order, is
unchanged. ``fedlayer run`` uses it; ``flwr run`` of a simulation starts Flower's engine in a process of
its own and keeps Flower's loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from queue import Queue

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

_FLOWER_LOOP = vce_api.add_messages_to_queue
POLL_SECONDS = 0.1  # Flower's interval between two passes


@contextmanager
def deliver_to_waiting_nodes() -> Iterator[None]:
    """While active, Flower's simulation engine queries only nodes that have a message waiting."""
    vce_api.add_messages_to_queue = add_waiting_messages_to_queue
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = _FLOWER_LOOP


def add_waiting_messages_to_queue(
    state: LinkState, queue: Queue[Message], nodes_mapping: Mapping[int, int], f_stop: threading.Event
) -> None:
    """Flower's ``add_messages_to_queue``, with a pass costing the messages waiting, not the nodes."""
    if not isinstance(state, InMemoryLinkState):  # another LinkState: keep Flower's own loop
        _FLOWER_LOOP(state, queue, nodes_mapping, f_stop)  # type: ignore[arg-type]
        return
    order = {node_id: i for i, node_id in enumerate(nodes_mapping)}
    while not f_stop.is_set():
        for node_id in waiting_nodes(state, order):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(POLL_SECONDS)


def waiting_nodes(state: InMemoryLinkState, order: Mapping[int, int]) -> list[int]:
    """Nodes of ``order`` with an undelivered instruction, in ``order``'s order (Flower's node order)."""
    with state.lock:
        nodes = {
            m.metadata.dst_node_id for m in state.message_ins_store.values() if not m.metadata.delivered_at
        }
    return sorted(nodes & order.keys(), key=order.__getitem__)
