"""The client side's Flower adapter: local training, personal layers kept in a :class:`PersonalStore` on disk.

What a client does locally is its algorithm's recipe (:mod:`fedlayer.client.recipes`, named by the declaration
in :mod:`strategies.algorithms`); ``lmc``'s measurement is :mod:`fedlayer.client.lmc`.

The experiment config arrives in every instruction (``config["experiment"]``, TOML), so the same
ClientApp runs unchanged in the simulation engine and on SuperNodes; the partition comes from the
node config (``partition-id``). Personal layers are on disk, not in ``context.state``: in simulation
every node's context lives in the server process (RAM growing with the clients), and a SuperNode loses
its context when it restarts.
"""

from __future__ import annotations

import functools
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from logging import ERROR
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from fedlayer.client import lmc, shadow
from fedlayer.client.recipes import LocalTask, personalize, train_locally
from fedlayer.client.store import PersonalStore, join_state, split_state
from fedlayer.config import Config, config_from_dict
from fedlayer.contract import (
    ANALYSIS_ROUND,
    ARRAYS,
    CONFIG,
    CUSTOMIZED,
    EXPERIMENT,
    FULL_MODEL,
    LMC_MEASURE,
    METRICS,
    NODE_DATA_DIR,
    NODE_STATE_DEFAULT,
    NODE_STATE_DIR,
    NUM_EXAMPLES,
    PARTITION_ID,
    PLACEMENT,
    RAY_NODE,
    REFERENCE,
    SERVER_ROUND,
    STATE_DIR,
    client_error,
    node_partition_id,
)
from fedlayer.data import TensorData
from fedlayer.data.folder import load_folder
from fedlayer.experiment import client_generator, federated_data, initial_model
from fedlayer.models import model_blocks, model_groups
from fedlayer.training import evaluate, load_state, resolve_device
from strategies.algorithms import get_algorithm

app = ClientApp()


@lru_cache(maxsize=4)
def _parse(experiment: str) -> Config:
    return config_from_dict(tomllib.loads(experiment))


def personal_store(config: ConfigRecord, context: Context) -> PersonalStore:
    """The store of this client's personal layers: the instruction's ``state-dir`` (simulation: the run's
    clients/ folder), else the node config's (a SuperNode's own folder, one subfolder per run)."""
    if config.get(STATE_DIR):
        return PersonalStore(str(config[STATE_DIR]))
    node_dir = Path(str(context.node_config.get(NODE_STATE_DIR, NODE_STATE_DEFAULT)))
    return PersonalStore(node_dir / f"run-{context.run_id}")


@dataclass
class ClientJob:
    """One instruction's work: the assembled model, the client's data and settings."""

    cfg: Config
    partition_id: int
    server_round: int
    model: torch.nn.Module
    train_data: TensorData
    test_data: TensorData
    device: torch.device
    received: list[str]  # keys that came from the server (shared); the rest are personal
    incoming: dict[str, torch.Tensor]  # the received values, before training
    store: PersonalStore
    client_state: dict[str, torch.Tensor]  # the recipe's state across rounds ("<name>.<key>"), never sent
    downlink: dict[str, torch.Tensor]  # this client's own record from the server (fedcac: customized model)
    own: dict[str, torch.Tensor]  # what the client kept from its last round, before the received keys

    @classmethod
    def from_message(cls, msg: Message, context: Context) -> ClientJob:
        config = msg.content.config_records[CONFIG]
        cfg = _parse(str(config[EXPERIMENT]))
        partition_id = node_partition_id(context.node_config)
        train_data, test_data = client_data(cfg, context.node_config)
        device = resolve_device(cfg.train.device)
        model = initial_model(cfg, train_data, get_algorithm(cfg.strategy).extension)
        server_round = int(config.get(SERVER_ROUND, 0))  # type: ignore[arg-type]
        store = personal_store(config, context)
        saved = store.load(partition_id, server_round)
        personal, client_state = split_state(saved or {})
        load_state(model, personal)  # nothing saved: the client never trained (the initial model's layers)
        arrays = msg.content[ARRAYS]
        incoming = arrays.to_torch_state_dict()  # type: ignore[union-attr]
        load_state(model, incoming)
        customized = msg.content.array_records.get(CUSTOMIZED)
        return cls(
            cfg,
            partition_id,
            server_round,
            model.to(device),
            train_data,
            test_data,
            device,
            list(arrays.keys()),
            incoming,
            store,
            client_state,
            customized.to_torch_state_dict() if customized is not None else {},
            personal,
        )

    @functools.cached_property
    def holdout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``lmc`` mixing: the fixed (training, held-out) indices of the training split, drawn once."""
        return lmc.split(self)

    def task(self) -> LocalTask:
        blocks, groups = model_blocks(self.model), model_groups(self.model)
        params = {name for name, _ in self.model.named_parameters()}
        head = {key for block in groups["head"] for key in blocks[block]} & params
        x, y = self.train_data.x, self.train_data.y
        if lmc.mixing(self.cfg):  # the held-out slice the mixing weights learn on is never trained on
            train, _ = self.holdout
            x, y = x[train], y[train]
        return LocalTask(
            self.model,
            x,
            y,
            self.cfg.train,
            self.cfg.strategy,
            self.device,
            client_generator(self.cfg, self.partition_id, self.server_round),
            head,
            set(self.received) & params,
            self.client_state,
            self.downlink,
        )

    def personalized_eval(self, task: LocalTask, *, last_round: bool = False) -> tuple[float, float]:
        model = personalize(get_algorithm(self.cfg.strategy), task, last_round=last_round)
        return evaluate(model, self.test_data.x, self.test_data.y, device=self.device)

    def state(self, keys: list[str] | None = None) -> ArrayRecord:
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return ArrayRecord({k: state[k] for k in (keys if keys is not None else state)})

    def personal_keys(self) -> list[str]:
        received = set(self.received)
        return [k for k in self.model.state_dict() if k not in received]

    def kept_keys(self) -> list[str]:
        """What the client keeps between rounds: its personal keys; every key when the shared set can
        change (``lmc``), so a block that turns personal continues from the client's own copy."""
        if get_algorithm(self.cfg.strategy).dynamic:
            return list(self.model.state_dict())
        return self.personal_keys()


def checked_state(cfg: Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The recipe's client state, each entry under a name its algorithm declares (else a bug: raise)."""
    declared = get_algorithm(cfg.strategy).state
    if undeclared := sorted({key.split(".")[0] for key in state} - set(declared)):
        raise KeyError(f"client state {undeclared} is not declared by {cfg.strategy.name!r}: {declared}")
    return state


def client_data(cfg: Config, node_config: Mapping[str, object]) -> tuple[TensorData, TensorData]:
    """The node's own data (node config ``data-dir``, ImageFolder layout) or its benchmark partition."""
    if node_config.get(NODE_DATA_DIR):
        return load_folder(str(node_config[NODE_DATA_DIR]), cfg.data.dataset, cfg.data.normalize)
    return federated_data(cfg).client(node_partition_id(node_config))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the assembled model with the algorithm's recipe; keep personal layers; reply shared ones."""
    partition_id = node_partition_id(context.node_config)
    try:
        return _train(msg, context)
    except Exception as err:
        # Flower reports only the exception text; the server logs the fault by partition id, and the
        # SuperNode's log gets the same one line before Flower's traceback.
        reason = client_error(partition_id, err)
        log(ERROR, "fedlayer: %s", reason)
        raise RuntimeError(reason) from err


def _train(msg: Message, context: Context) -> Message:
    job = ClientJob.from_message(msg, context)
    task = job.task()
    reference = msg.content.array_records.get(REFERENCE)
    mixing = lmc.mixing(job.cfg)
    weights = lmc.mix(job, task, reference) if mixing else {}
    evaluating = job.cfg.federation.evaluates(job.server_round)  # federation.evaluate_every
    before = job.personalized_eval(task) if evaluating and job.cfg.train.evaluate_before else None
    if shadow.shadowing(job):
        train_loss, gains = shadow.train_with_shadows(job, task, reference)
        weights |= gains
    else:
        train_loss = train_locally(get_algorithm(job.cfg.strategy), task)
    after = job.personalized_eval(task) if evaluating and job.cfg.train.evaluate_after else None
    kept = job.state(job.kept_keys()).to_torch_state_dict()
    job.store.save(job.partition_id, job.server_round, join_state(kept, checked_state(job.cfg, task.state)))
    config = msg.content[CONFIG]
    full = bool(config.get(FULL_MODEL, False))
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: len(task.y),
            PARTITION_ID: job.partition_id,
            "train_loss": train_loss,
        }
    )
    if after is not None:
        loss_after, metrics["personalized_acc_after"] = after
        metrics["personalized_loss_after"] = loss_after
    if before is not None:
        metrics["personalized_loss_before"], metrics["personalized_acc_before"] = before
    if config.get(LMC_MEASURE):
        evidence = weights if mixing else lmc.cost_metrics(job, reference)
        for key, value in evidence.items():
            metrics[key] = value
    keys = None if full else job.received
    if full and shadow.shadowing(job) and not config.get(ANALYSIS_ROUND):  # shadows stand in for their copies
        keys = shadow.uploaded_keys(job, task)
    arrays = job.state(keys)
    content = RecordDict({ARRAYS: arrays, METRICS: metrics})
    for name, tensors in task.upload.items():  # per-client records up (fedcac: the critical mask)
        content[name] = ArrayRecord(tensors)
    node = _ray_node_id()
    if node is not None:
        content[PLACEMENT] = ConfigRecord({RAY_NODE: node})
    return Message(content, reply_to=msg)


def _ray_node_id() -> str | None:
    """The Ray node running this client (simulation); ``None`` outside Ray (a SuperNode never imports it)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return str(ray.get_runtime_context().get_node_id())


@app.query("partition")
def query_partition(msg: Message, context: Context) -> Message:
    """This node's partition id (the server orders nodes by it, so sampling is reproducible)."""
    metrics = MetricRecord({PARTITION_ID: node_partition_id(context.node_config)})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate_personalized(msg: Message, context: Context) -> Message:
    """Personalized accuracy: global shared + own personal layers, on the local test split."""
    job = ClientJob.from_message(msg, context)
    task = job.task()
    last_round = job.server_round == job.cfg.federation.rounds
    finetuned: dict[str, float] = {}
    if lmc.mixing(job.cfg):
        lmc.apply_weights(job, task)
        if last_round and job.cfg.strategy.lmc_finetune:
            finetuned = lmc.finetune_if_better(job, task)
    loss, acc = job.personalized_eval(task, last_round=last_round)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: len(job.test_data),
            PARTITION_ID: job.partition_id,
            "personalized_acc": acc,
            "personalized_loss": loss,
            **finetuned,
        }
    )
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)
