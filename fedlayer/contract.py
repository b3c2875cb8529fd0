"""The wire: what the server and the clients say to each other, named once.

Flower's Message API carries RecordDicts; fedlayer's messages hold one ArrayRecord (``arrays``), one
ConfigRecord (``config``) on the way down and one MetricRecord (``metrics``) on the way up; an algorithm
with per-client traffic adds its own named ArrayRecords (FedCAC: ``customized`` down, ``critical`` up).
Every key of them, the node-config keys a SuperNode is started with, and the way a client's partition id
travels (in its metrics, or inside the text of an error reply, since Flower passes only the exception text)
live here, so that both sides and every reader of replies agree by construction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:  # the contract loads without Flower (config validation, the deploy command)
    from flwr.app import Message

# Record names in a message's content.
ARRAYS = "arrays"  # ArrayRecord: shared keys down; shared keys (or the full model) up
CONFIG = "config"  # ConfigRecord of an instruction
METRICS = "metrics"  # MetricRecord of a reply
REFERENCE = "reference"  # train instruction, lmc: the server's value of the round's personal blocks
PLACEMENT = "placement"  # train reply in simulation: ConfigRecord {RAY_NODE: id}
CUSTOMIZED = "customized"  # instruction, fedcac: this client's customized model (one per client)
CRITICAL = "critical"  # train reply, fedcac: the client's critical-parameter mask (bool, by parameter)
RAY_NODE = "ray-node-id"

# Keys of an instruction's ConfigRecord.
EXPERIMENT = "experiment"  # the resolved experiment config, TOML
SERVER_ROUND = "server-round"  # set by Flower's strategies
FULL_MODEL = "full-model"  # reply with the full model (analysis rounds, lmc collection rounds)
LMC_MEASURE = "lmc-measure"  # measure the cost of sharing each block (lmc decision rounds)
ANALYSIS_ROUND = "analysis-round"  # the full model goes to the analysis (lmc shadow: own copies, not shadows)
STATE_DIR = "state-dir"  # where the client keeps personal layers (simulation: the run's clients/ folder)

# Keys of a reply's MetricRecord.
NUM_EXAMPLES = "num-examples"  # the aggregation weight (Flower's own key)
PARTITION_ID = "partition-id"
COST_PREFIX = "lmc."  # "lmc.<block>": the client's cost of sharing that block
MIX_PREFIX = (
    "mix."  # "mix.<block>": the client's learned weight of the server's value of that block (lmc mixing)
)
# "shadow.<block>": a client's held-out gain of sharing that tail block (lmc shadow, nats; > 0: sharing wins)
SHADOW_PREFIX = "shadow."
SHADOW = "shadow"  # the train reply's record of a client's shadows of its personal tail blocks (lmc shadow)
TRAIN_METRICS = ("train_loss", "personalized_acc_before", "personalized_acc_after", "personalized_loss_after")
EVALUATE_METRICS = ("personalized_acc", "personalized_loss")
# evaluate reply after the last round, lmc_finetune > 0: whether the client kept its fine-tuned model (0/1)
# and the held-out loss it gained by fine-tuning (nats; negative: fine-tuning hurt, the model stays as it was)
FINETUNE_METRICS = ("finetune_kept", "finetune_holdout_gain")

# Node config of a SuperNode (``--node-config``); simulation sets partition-id and num-partitions itself.
NODE_PARTITION_ID = PARTITION_ID
NODE_PARTITIONS = "num-partitions"
NODE_DATA_DIR = "data-dir"  # own data in the ImageFolder layout
NODE_STATE_DIR = STATE_DIR  # a SuperNode's folder for personal layers
NODE_STATE_DEFAULT = "fedlayer-state"  # its default, relative to the SuperNode's working directory

# Analysis rows: the id of the global model among client ids (barriers.csv, landscape.csv).
GLOBAL = "global"

_ERROR_PARTITION = re.compile(rf"{PARTITION_ID}=(\d+)")
_ERROR_LINE = re.compile(rf"{PARTITION_ID}=\d+: .*")
_ERROR_PREFIX = re.compile(rf"^{PARTITION_ID}=\d+: ")


def node_partition_id(node_config: Mapping[str, object]) -> int:
    """The partition a node trains on, from its node config."""
    return int(cast(int, node_config[NODE_PARTITION_ID]))


def client_error(partition_id: int, err: BaseException) -> str:
    """The text of a client's error reply: Flower sends only this, so it names the partition."""
    return f"{PARTITION_ID}={partition_id}: {type(err).__name__}: {err}"


def error_cause(reason: str) -> str:
    """The cause in a client's error reply, one line: what :func:`client_error` wrote,
    found in whatever the engine wrapped around it (the simulation's reply holds Ray's whole traceback);
    the whole reason, on one line, when no such text is in it."""
    found = _ERROR_LINE.findall(reason)
    return found[-1].removesuffix("'>").strip() if found else " ".join(reason.split())


def without_partition(cause: str) -> str:
    """A client's error text without the partition id in front (for a line that names the partition)."""
    return _ERROR_PREFIX.sub("", cause, count=1)


def partition_of(reply: Message, known: Mapping[int, int], node_id: int | None = None) -> int | None:
    """The client's partition id: from its metrics, its error text (:func:`client_error`), or an earlier
    reply of its node (``known``: node id -> partition id; ``node_id`` default: the reply's source)."""
    if reply.has_content():
        for record in reply.content.metric_records.values():
            if PARTITION_ID in record:
                return int(cast(float, record[PARTITION_ID]))
    elif match := _ERROR_PARTITION.search(reply.error.reason or ""):
        return int(match.group(1))
    return known.get(reply.metadata.src_node_id if node_id is None else node_id)
