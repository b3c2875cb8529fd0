"""Every use of Flower 1.42's internals, in one place; ``tests/test_flower.py`` fails loudly when an
upgrade changes one of them.

fedlayer builds on Flower's public Message API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``). Where
it needs more, it reaches into Flower here and nowhere else:

- :func:`run_in_process`: the deprecated in-process entry point ``flwr.simulation.run_simulation``. ``flwr
  run`` would run the ServerApp in a process spawned by a detached SuperLink; ``fedlayer run`` needs it in its
  own process (per-round progress, a Ctrl-C that stops cleanly, nothing left running).
- :func:`is_simulation` / :func:`simulated_partitions`: the simulation engine's in-memory grid and LinkState,
  which register the node of partition i as the i-th node (``vce_api._register_nodes``), so the
  node -> partition mapping needs no message.
- :data:`STRATEGY_STATE`: the attributes in which Flower's server-side optimizers (FedAvgM, FedAdam,
  FedYogi, FedAdagrad) keep their state between rounds, checkpointed so a resume continues them exactly.
- :func:`deliver_to_waiting_nodes`: a replacement for the engine's message-delivery loop.
- :class:`OneLineErrors`: the ServerApp runner logs an exception that ends the ServerApp with its traceback
  (``log(ERROR, ..., exc_info=ex)``); for a user's mistake (a config error) one line says all.
- Names Flower does not promise: its logger (:data:`LOGGER`; fedlayer's log lines join it) and the process
  title of its client actors (:data:`CLIENT_ACTOR`, stopped on Ctrl-C).
- :func:`colour_on_terminal_only`: Flower's console log handler colours its levels with ANSI codes always.

The delivery loop: flwr 1.42's engine hands instructions to its client workers from a thread that, every
0.1 s, asks the in-memory LinkState for the next message of *every* registered node
(``vce_api.add_messages_to_queue``), and each such query scans every stored message. That is
nodes x messages work ten times a second in the process hosting the ServerApp, however few clients a round
samples: at 10,000 clients that thread held the GIL most of the time, and a round took 2.2x the 100-client
round (bench/RESULTS.md, "Scale"). :func:`deliver_to_waiting_nodes` swaps in a loop that asks only the nodes
an undelivered message is waiting for, in the same order and with the same LinkState call: what each node
receives, and in which order, is unchanged. ``fedlayer run`` uses it; ``flwr run`` of a simulation starts
Flower's engine in a process of its own and keeps Flower's loop.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from queue import Queue
from typing import Any

from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.common.logger import update_console_handler
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

LOGGER = "flwr"  # Flower's logger; fedlayer logs through it (flwr.common.logger.log), flower.log collects it
CLIENT_ACTOR = "ray::ClientAppActor"  # process title of Flower's client actors (Ray: "ray::<class>")
# Server-side optimizer state of Flower's strategies (FedAvgM, FedOpt family); absent attributes are skipped.
STRATEGY_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t")


def colour_on_terminal_only() -> None:
    """Flower's console log (fedlayer's warnings use it) without ANSI colour codes when stderr is not a
    terminal (a log file, a CI job, ``2>&1 | tee``)."""
    update_console_handler(colored=sys.stderr.isatty())


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


def run_in_process(
    server_app: ServerApp, client_app: ClientApp, num_supernodes: int, backend_config: dict[str, Any]
) -> None:
    """Flower's simulation engine in this process (``flwr.simulation.run_simulation``; its deprecation banner
    goes to the log)."""
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config=backend_config,
    )


def is_simulation(grid: Grid) -> bool:
    """Whether ``grid`` is the simulation engine's (the clients then share this machine's file system)."""
    return isinstance(grid, InMemoryGrid)


def simulated_partitions(grid: Grid, clients: int, timeout: float = 60.0) -> dict[int, int] | None:
    """Node id -> partition id in Flower's simulation engine, without a message; ``None`` elsewhere.

    flwr 1.42 registers the node of partition i as the i-th node of its in-memory LinkState
    (``vce_api._register_nodes``), which keeps nodes in that order. The strategy checks the partition id
    of every reply against this mapping.
    """
    state = getattr(grid, "state", None)
    if not isinstance(grid, InMemoryGrid) or not isinstance(state, InMemoryLinkState):
        return None
    deadline = time.monotonic() + timeout  # the engine registers its nodes while the ServerApp starts
    while len(nodes := state.get_node_info()) < clients and time.monotonic() < deadline:
        time.sleep(0.1)
    return {node.node_id: pid for pid, node in enumerate(nodes)}


def one_line_errors(*kinds: type[BaseException]) -> None:
    """Exceptions of ``kinds`` that end the ServerApp are logged as one line (see :class:`OneLineErrors`)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(f, OneLineErrors) and f.kinds == kinds for f in logger.filters):
        logger.addFilter(OneLineErrors(*kinds))


class OneLineErrors(logging.Filter):
    """On Flower's logger: a record logging an exception of ``kinds`` loses its traceback and says the
    exception's one line instead (the run still fails; ``flwr ls`` shows it failed)."""

    def __init__(self, *kinds: type[BaseException]) -> None:
        super().__init__()
        self.kinds = kinds

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, self.kinds):
            record.msg, record.args, record.exc_info = "fedlayer: %s", (error,), None
        return True
