"""Test-only ClientApp: fedlayer's own ClientApp behind a Flower mod that injects faults into train replies.

A simulation runs it with ``--set federation.client_app='tests.fault_injection:app'`` (from the repository
root, where ``tests`` is importable). ``$FEDLAYER_TEST_FAULT`` says which client misbehaves in which round:
``kind:partition:round[,...]`` with kind

- ``raise``: the ClientApp fails (an error reply naming the partition, as fedlayer's ClientApp does);
- ``nan``, ``inf``: the first array of the reply holds a non-finite value;
- ``shape``, ``missing``, ``extra``: the first array has a wrong shape, is left out, or a key is added;
- ``personal-shape``: on a full-model (analysis) round, the first personal array has a wrong shape. The
  server never aggregates personal layers, so training goes on, but the analysis of that round fails.
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedlayer.client import app as fedlayer_client

FAULTS_ENV = "FEDLAYER_TEST_FAULT"


def fault_for(partition_id: int, server_round: int) -> str:
    """The fault ``$FEDLAYER_TEST_FAULT`` injects for this client and round ("" = none)."""
    for item in os.environ.get(FAULTS_ENV, "").split(","):
        kind, _, where = item.strip().partition(":")
        if kind and where == f"{partition_id}:{server_round}":
            return kind
    return ""


def inject_faults(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower mod: train replies come back as a faulty client would send them."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    partition_id = int(context.node_config["partition-id"])
    fault = fault_for(partition_id, int(msg.content["config"]["server-round"]))  # type: ignore[arg-type]
    if fault == "raise":
        raise RuntimeError(f"partition-id={partition_id}: {FAULTS_ENV}: injected failure")
    reply = call_next(msg, context)
    if fault:
        received = set(msg.content.array_records["arrays"].keys())
        corrupt(reply.content.array_records["arrays"], fault, received)
    return reply


def corrupt(arrays: ArrayRecord, fault: str, received: set[str]) -> None:
    """Damage ``arrays`` in place; ``received`` are the keys the server sent (the rest are personal)."""
    keys = [key for key in arrays if fault != "personal-shape" or key not in received]
    first = keys[0]
    value = arrays[first].numpy().astype(np.float32)
    if fault in ("nan", "inf"):
        value.flat[0] = np.nan if fault == "nan" else np.inf
        arrays[first] = Array(value)
    elif fault in ("shape", "personal-shape"):
        arrays[first] = Array(np.zeros((*value.shape, 2), dtype=np.float32))
    elif fault == "missing":
        del arrays[first]
    elif fault == "extra":
        arrays["injected.extra"] = Array(np.zeros(3, dtype=np.float32))
    else:
        raise ValueError(f"{FAULTS_ENV}: unknown fault {fault!r}")


app = ClientApp(mods=[inject_faults])
app.train()(fedlayer_client.train)
app.evaluate()(fedlayer_client.evaluate_personalized)
app.query("partition")(fedlayer_client.query_partition)
