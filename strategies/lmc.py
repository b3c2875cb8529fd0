"""``lmc``, barrier-guided sharing: every part of it on the server side; the client side is
:mod:`fedlayer.client.lmc` (what a client measures) over :mod:`fedlayer.analysis.sharing` (the maths).

Barrier-guided sharing closes the loop between the analysis and the aggregation. On *decision rounds* every
sampled client reports, for each block l, what moving l halfway to the server's reference costs it on its
own data: c_l = L(θ_i with block l at ½(θ_i^l + ref^l)) − L(θ_i) (see
``fedlayer.analysis.sharing.sharing_costs``). The server aggregates the costs over clients (sample-weighted
mean, max or a quantile) and shares in the next rounds exactly the blocks whose cost is at most
``strategy.lmc_threshold`` (or the cheapest ``strategy.lmc_share_fraction`` of them). Blocks matched by
``strategy.exclude`` are never shared, those matched by ``strategy.lmc_always`` always; a norm block follows
the block it normalizes (the nearest non-norm block before it in the model), or with ``strategy.lmc_norm =
"decide"`` is decided by its own evidence like any other block.

By default a block that turned personal stays personal (``strategy.lmc_reshare = false``): only shared blocks
are measured, against the round's global blocks, and decision rounds move no full models. The cost is a
*local* quantity, and once a block is shared every client's copy is one local epoch from the global one, so
its cost stays small whether or not sharing it hurts: a rule that re-shares a personal block as soon as its
cost toward the clients' average falls under the threshold shared classifier blocks again in 3 of 4
measured runs, twice for good at FedAvg's accuracy (experiments/README.md, ``lmc.toml``). With
``lmc_reshare = true`` decision rounds measure every block: clients send every block up and the server
averages the personal ones as their reference.

``strategy.lmc_criterion = "mixing"`` (:class:`MixingPolicy`) decides instead from weights the clients learn
(:mod:`fedlayer.client.lmc`): every client keeps its own copy of every block and a weight w_l in [0, 1] per
block; each round it starts from θ_l = θ_l^own + w_l (θ_l^server − θ_l^own) for every block with a server
value, w_l learned by a few SGD steps on a slice of its training data it never trains on. A client whose
held-out loss falls by leaning on the others pulls w_l up, one that does better alone pulls it down, and
over rounds w_l integrates that evidence instead of measuring one epoch's drift. The server shares block l
while the clients' sample-weighted mean of w_l stays at least ``lmc_weight_threshold - lmc_weight_margin``
and shares a personal block again once it reaches ``lmc_weight_threshold + lmc_weight_margin``; decision
rounds always carry the reference of the personal blocks (``lmc_reshare``'s traffic), so the clients keep
learning the weight of a personal block against the others' average.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fedlayer.config import ConfigError, StrategyConfig
from fedlayer.contract import GLOBAL, MIX_PREFIX, SHADOW_PREFIX
from strategies.mechanism import RoundObserver
from strategies.sharing import SharingPolicy

if TYPE_CHECKING:  # the policy stays importable without torch (config validation)
    from flwr.app import ArrayRecord
    from torch import nn

    from fedlayer.layers import Resolution

_DEFAULT = StrategyConfig()  # the defaults below are the config's, declared once there


@dataclass(frozen=True)
class LmcRule:
    """How per-client costs become the next shared set.

    Attributes
    ----------
    threshold : float
        A block is shared when its aggregated cost is at most this (loss units, nats).
    fraction : float
        When > 0, share instead the ``ceil(fraction x n)`` cheapest deciding blocks (ties: model order).
    statistic : str
        ``mean`` (weighted by the clients' ``num-examples``), ``max``, or ``quantile`` (unweighted).
    quantile : float
        The quantile in [0, 1] for ``statistic = "quantile"``.
    """

    threshold: float = _DEFAULT.lmc_threshold
    fraction: float = _DEFAULT.lmc_share_fraction
    statistic: str = _DEFAULT.lmc_statistic
    quantile: float = _DEFAULT.lmc_quantile

    def aggregate(self, costs: Sequence[float], weights: Sequence[float]) -> float:
        """One block's costs over clients -> one number."""
        values = np.asarray(costs, dtype=float)
        if self.statistic == "max":
            return float(values.max())
        if self.statistic == "quantile":
            return float(np.quantile(values, self.quantile))
        return float(np.average(values, weights=np.asarray(weights, dtype=float)))

    def choose(self, costs: Mapping[str, float], out_of: int | None = None) -> set[str]:
        """The blocks of ``costs`` (block -> aggregated cost, model order) that are shared; a fraction is
        of ``out_of`` blocks (default: those in ``costs``)."""
        if self.fraction > 0:
            ranked = sorted(costs, key=lambda block: (costs[block], list(costs).index(block)))
            return set(ranked[: math.ceil(self.fraction * (out_of or len(ranked)))])
        return {block for block, cost in costs.items() if cost <= self.threshold}


@dataclass
class LmcPolicy(SharingPolicy):
    """Barrier-guided sharing: costs measured in decision rounds set the shared set of the next rounds.

    Parameters
    ----------
    rule : LmcRule
        Threshold or fraction, and the statistic over clients.
    every : int
        Rounds every, 2·every, ... are decision rounds (every round when 1).
    always, never : set[str]
        Blocks always shared (``strategy.lmc_always``) / never shared (``strategy.exclude``).
    reshare : bool
        Whether a personal block can be shared again (``strategy.lmc_reshare``; see the module docstring).
    norm : set[str]
        Norm blocks: they follow the block they normalize instead of deciding by their own cost.

    Attributes
    ----------
    history : dict[int, list[str]]
        Round -> the blocks shared in it (filled as rounds are configured).
    costs : dict[int, dict[str, float]]
        Decision round -> aggregated cost per block.
    """

    rule: LmcRule = field(default_factory=LmcRule)
    every: int = _DEFAULT.lmc_every
    source: str = _DEFAULT.lmc_source  # clients: costs in the train replies; server: the hook's barriers
    always: set[str] = field(default_factory=set)
    never: set[str] = field(default_factory=set)
    reshare: bool = _DEFAULT.lmc_reshare
    norm: set[str] = field(default_factory=set)
    history: dict[int, list[str]] = field(default_factory=dict)
    costs: dict[int, dict[str, float]] = field(default_factory=dict)
    referenced: set[str] = field(default_factory=set)

    evidence_name: ClassVar[str] = "costs"  # what layers_by_round.json calls a decision round's evidence

    def __post_init__(self) -> None:
        super().__post_init__()
        self.shared = self._constrained(set(self.shared))
        # A block personal from the start has no server value for clients to measure against until a
        # decision round has averaged it: it stays personal until then. Pairwise barriers (server) need none.
        self.referenced = set(self.shared) if self.source == "clients" else set(self.blocks)

    @property
    def dynamic(self) -> bool:
        return True

    def measures(self, server_round: int) -> bool:
        return server_round % self.every == 0

    def clients_measure(self, server_round: int) -> bool:
        return self.source == "clients" and self.measures(server_round)

    def collects(self, server_round: int) -> bool:
        return self.reshare and self.measures(server_round)

    def owner(self, block: str) -> str:
        """The block a norm block follows: the nearest non-norm block before it (itself if none)."""
        names = list(self.blocks)
        before = [name for name in names[: names.index(block)] if name not in self.norm]
        return before[-1] if block in self.norm and before else block

    def deciding(self) -> list[str]:
        """Blocks decided by their own cost (not norm followers, not fixed by always / never)."""
        fixed = self.always | self.never
        return [block for block in self.blocks if self.owner(block) == block and block not in fixed]

    def decide(
        self, server_round: int, client_costs: Sequence[Mapping[str, float]], weights: Sequence[float]
    ) -> None:
        """Aggregate the clients' costs of ``server_round`` and set the shared set of the next rounds.

        Only shared blocks decide unless ``reshare``; blocks without a reference yet keep their current
        state; with a cost missing for any client the set stays as it is."""
        candidates = self.referenced if self.reshare else {self.owner(block) for block in self.shared}
        everyone = self.deciding()
        deciding = [block for block in everyone if block in candidates]
        costs = {
            block: self.rule.aggregate([c[block] for c in client_costs], weights)
            for block in deciding
            if all(block in c for c in client_costs)
        }
        self.costs[server_round] = costs
        if len(costs) == len(deciding) and client_costs:
            chosen = self.rule.choose(costs, out_of=len(everyone))  # the others turn or stay personal
            self.shared = self._constrained(chosen)
        if self.reshare:
            self.referenced = set(self.blocks)  # this decision round averaged every block

    def _constrained(self, chosen: set[str]) -> list[str]:
        """``chosen`` plus always, minus never; norm blocks follow their owner; in model order."""
        decided = (chosen | self.always) - self.never
        return [
            block
            for block in self.blocks
            if block not in self.never and (block in self.always or self.owner(block) in decided)
        ]

    def evidence(self, server_round: int) -> dict[str, float]:
        """What decided in ``server_round``, per block (empty outside decision rounds)."""
        return self.costs.get(server_round, {})

    def record(self, server_round: int) -> None:
        self.history[server_round] = self.shared_blocks()

    def logged(self, server_round: int) -> dict[str, Any]:
        """What ``layers_by_round.json`` holds of ``server_round`` beside its shared blocks."""
        return {self.evidence_name: self.evidence(server_round)}

    def state(self) -> dict[str, Any]:
        return {
            "shared": list(self.shared),
            "history": dict(self.history),
            "costs": dict(self.costs),
            "referenced": sorted(self.referenced),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.shared = list(state["shared"])
        self.referenced = set(state["referenced"])
        self.history = {int(k): list(v) for k, v in state["history"].items()}
        self.costs = {int(k): dict(v) for k, v in state["costs"].items()}


@dataclass(frozen=True)
class MixingRule:
    """When a block is shared, from its clients' mean mixing weight (``lmc_criterion = "mixing"``).

    Attributes
    ----------
    threshold : float
        The weight around which a block switches.
    margin : float
        Hysteresis: a shared block turns personal below ``threshold - margin``; a personal one turns shared
        at ``threshold + margin`` or above (a weight between them keeps the block as it is).
    """

    threshold: float = _DEFAULT.lmc_weight_threshold
    margin: float = _DEFAULT.lmc_weight_margin

    def shares(self, shared: bool, weight: float) -> bool:
        """Whether a block that is ``shared`` now is shared next, given its aggregated weight."""
        return weight >= (self.threshold - self.margin if shared else self.threshold + self.margin)


@dataclass
class MixingPolicy(LmcPolicy):
    """``lmc`` with learned mixing per block: the clients' weights of the server's values set the shared set.

    Decision rounds always collect (clients send every block up, the server averages the personal ones and
    sends that reference down in the next decision round), so a personal block keeps being weighed and can be
    shared again. A block decides once it has a server value (a block personal from the start: after the
    first decision round), from the clients that reported its weight (a client in its first round has no
    own copy and reports none); a block no client reported keeps its state.

    Attributes
    ----------
    mixing : MixingRule
        Threshold and hysteresis margin.
    weights : dict[int, dict[str, float]]
        Decision round -> the clients' sample-weighted mean weight per deciding block.
    """

    mixing: MixingRule = field(default_factory=MixingRule)
    weights: dict[int, dict[str, float]] = field(default_factory=dict)
    evidence_prefixes: ClassVar[tuple[str, ...]] = (MIX_PREFIX,)
    evidence_name: ClassVar[str] = "weights"

    def collects(self, server_round: int) -> bool:
        return self.measures(server_round)

    def reference_keys(self, personal: Sequence[str]) -> list[str]:
        """Only blocks the server has averaged: a never-averaged block's value is the initial model's, and
        mixing toward it would pull clients back to their start."""
        referenced = {key for block in self.referenced for key in self.blocks[block]}
        return [key for key in personal if key in referenced]

    def decide(
        self, server_round: int, client_costs: Sequence[Mapping[str, float]], weights: Sequence[float]
    ) -> None:
        """``client_costs`` are the clients' weights per block (the name is the interface's)."""
        aggregated = {}
        for block in self.deciding():
            found = [(c[block], n) for c, n in zip(client_costs, weights, strict=True) if block in c]
            if block in self.referenced and found:
                values, samples = zip(*found, strict=True)
                aggregated[block] = float(np.average(values, weights=np.asarray(samples, float)))
        self.weights[server_round] = aggregated
        now = set(self.shared)
        chosen = {
            block
            for block in self.deciding()
            if (self.mixing.shares(block in now, aggregated[block]) if block in aggregated else block in now)
        }
        self.shared = self._constrained(chosen)
        self.referenced = set(self.blocks)  # this decision round averaged every block

    def evidence(self, server_round: int) -> dict[str, float]:
        return self.weights.get(server_round, {})

    def state(self) -> dict[str, Any]:
        return super().state() | {"weights": dict(self.weights)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        self.weights = {int(k): dict(v) for k, v in state["weights"].items()}


@dataclass(frozen=True)
class ShadowRule:
    """When a tail block is shared, from its running held-out gain of sharing (``lmc_criterion = "shadow"``).

    Attributes
    ----------
    decay : float
        running ← decay · running + (1 − decay) · the round's gain (the first gain starts it).
    margin : float
        Hysteresis (nats): a shared block turns personal once running < −margin, a personal one is shared
        again once running > +margin.
    """

    decay: float = _DEFAULT.lmc_shadow_decay
    margin: float = _DEFAULT.lmc_shadow_margin

    def update(self, running: float | None, gain: float) -> float:
        return gain if running is None else self.decay * running + (1 - self.decay) * gain

    def shares(self, shared: bool, running: float) -> bool:
        return running >= -self.margin if shared else running > self.margin


@dataclass
class ShadowPolicy(MixingPolicy):
    """``lmc`` with shadows of the tail blocks: the model's upper blocks (:func:`fedlayer.models.tail_blocks`)
    are decided by comparing two trajectories at equal adaptation, the lower ones by mixing weights.

    Each client trains, beside every tail block, a shadow copy in the other regime on the same batches
    (:mod:`fedlayer.client.shadow`): the personal trajectory of a shared block (its own copy, never replaced
    by the server's) and the shared trajectory of a personal block (restarted every round from the server's
    average of the clients' shadows). It reports the held-out gain of sharing each tail block, g = L(personal
    copy) − L(shared copy) on its held-out slice; the server keeps a running, sample-weighted mean of g per
    block across rounds (:class:`ShadowRule`) and shares the block while it stays above −margin (personal:
    once it rises above +margin). Decisions every round (``lmc_every = 1``).

    Attributes
    ----------
    tail : tuple[str, ...]
        The tail blocks, decided by their shadows.
    shadow : ShadowRule
        Decay of the running gain and the hysteresis margin.
    gains : dict[int, dict[str, float]]
        Decision round -> the clients' sample-weighted mean gain per tail block.
    running : dict[str, float]
        Tail block -> its running gain (the evidence that decides).
    running_by_round : dict[int, dict[str, float]]
        Decision round -> ``running`` after it (logged).
    """

    tail: tuple[str, ...] = ()
    shadow: ShadowRule = field(default_factory=ShadowRule)
    gains: dict[int, dict[str, float]] = field(default_factory=dict)
    running: dict[str, float] = field(default_factory=dict)
    running_by_round: dict[int, dict[str, float]] = field(default_factory=dict)
    evidence_prefixes: ClassVar[tuple[str, ...]] = (MIX_PREFIX, SHADOW_PREFIX)

    def decide(
        self, server_round: int, client_costs: Sequence[Mapping[str, float]], weights: Sequence[float]
    ) -> None:
        """Lower blocks by their weights (:class:`MixingPolicy`), tail blocks by their running gains."""
        tail = set(self.tail)
        before = set(self.shared)
        super().decide(
            server_round, [{b: v for b, v in c.items() if b not in tail} for c in client_costs], weights
        )
        gains = {}
        for block in [b for b in self.deciding() if b in tail]:
            found = [(c[block], n) for c, n in zip(client_costs, weights, strict=True) if block in c]
            if found:
                values, samples = zip(*found, strict=True)
                gains[block] = float(np.average(values, weights=np.asarray(samples, float)))
                self.running[block] = self.shadow.update(self.running.get(block), gains[block])
        self.gains[server_round] = gains
        self.running_by_round[server_round] = dict(self.running)
        lower = {self.owner(b) for b in self.shared} - tail
        chosen = lower | {
            block
            for block in self.deciding()
            if block in tail
            and (
                self.shadow.shares(block in before, self.running[block])
                if block in gains
                else block in before
            )
        }
        self.shared = self._constrained(chosen)

    def logged(self, server_round: int) -> dict[str, Any]:
        return super().logged(server_round) | {
            "gains": self.gains.get(server_round, {}),
            "running": self.running_by_round.get(server_round, {}),
        }

    def state(self) -> dict[str, Any]:
        return super().state() | {
            "gains": dict(self.gains),
            "running": dict(self.running),
            "running_by_round": dict(self.running_by_round),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        super().load_state(state)
        self.gains = {int(k): dict(v) for k, v in state["gains"].items()}
        self.running = dict(state["running"])
        self.running_by_round = {int(k): dict(v) for k, v in state["running_by_round"].items()}


def lmc_policy(strategy: StrategyConfig, model: nn.Module, layers: Resolution) -> LmcPolicy:
    """The policy of ``strategy`` over ``model``'s blocks, starting from the resolved shared set."""
    from fedlayer.models import model_groups

    never = _blocks(strategy.exclude, model, "strategy.exclude")
    always = _blocks(strategy.lmc_always, model, "strategy.lmc_always")
    if both := sorted(never & always):
        raise ConfigError(f"strategy.lmc_always: {', '.join(both)} also excluded by strategy.exclude")
    norm = set(model_groups(model)["norm"]) if strategy.lmc_norm == "follow" else set()
    if strategy.lmc_criterion in ("mixing", "shadow"):
        mixing = MixingRule(strategy.lmc_weight_threshold, strategy.lmc_weight_margin)
        common = dict(
            every=strategy.lmc_every, always=always, never=never, reshare=True, norm=norm, mixing=mixing
        )
        if strategy.lmc_criterion == "mixing":
            return MixingPolicy(layers.blocks, layers.shared_blocks, **common)  # type: ignore[arg-type]
        shadow = ShadowRule(strategy.lmc_shadow_decay, strategy.lmc_shadow_margin)
        tail = _tail(model)
        return ShadowPolicy(layers.blocks, layers.shared_blocks, **common, tail=tail, shadow=shadow)  # type: ignore[arg-type]
    rule = LmcRule(
        strategy.lmc_threshold, strategy.lmc_share_fraction, strategy.lmc_statistic, strategy.lmc_quantile
    )
    return LmcPolicy(
        layers.blocks,
        layers.shared_blocks,
        rule=rule,
        every=strategy.lmc_every,
        source=strategy.lmc_source,
        always=always,
        never=never,
        reshare=strategy.lmc_reshare,
        norm=norm,
    )


def _tail(model: nn.Module) -> tuple[str, ...]:
    from fedlayer.models import model_name, tail_blocks

    tail = tail_blocks(model)
    if not tail:
        raise ConfigError(
            f"strategy.lmc_criterion: 'shadow' needs a model with a tail (cnn, pfllib_cnn, mlp); "
            f"model.name = {model_name(model)!r} has none"
        )
    return tail


def _blocks(patterns: list[str], model: nn.Module, field: str) -> set[str]:
    from fedlayer.layers import Selector, resolve

    if not patterns:
        return set()
    return set(resolve(Selector(include=patterns), model, field=field).shared_blocks)


class SharingLog(RoundObserver):
    """Hands ``write`` (the run's ``layers_by_round.json``) every round's shared blocks and, in decision
    rounds, the evidence that decided: measured ``costs`` (barrier) or aggregated ``weights`` (mixing)."""

    def __init__(self, policy: LmcPolicy, write: Callable[[dict[str, Any]], None]) -> None:
        self.policy, self.write = policy, write

    def on_aggregated(self, server_round: int, previous: ArrayRecord, aggregated: ArrayRecord) -> None:
        rounds = {
            r: {"shared": shared, **self.policy.logged(r)}
            for r, shared in sorted(self.policy.history.items())
        }
        self.write({"blocks": list(self.policy.blocks), "rounds": rounds})


class ServerCosts(RoundObserver):
    """``lmc_source = "server"``: a decision from the analysis hook's layer barriers of the round
    (``rows_of(round)`` waits for them), as the mean over pairs and both bases of the midpoint barrier B_l."""

    def __init__(self, rows_of: Callable[[int], list[dict[str, Any]]], policy: LmcPolicy) -> None:
        self.rows_of, self.policy = rows_of, policy

    def on_aggregated(self, server_round: int, previous: ArrayRecord, aggregated: ArrayRecord) -> None:
        if not self.policy.measures(server_round):
            return
        rows = [
            r
            for r in self.rows_of(server_round)
            if r["kind"] == "layer"
            and float(r["alpha"]) == 0.5
            and GLOBAL not in (r["client_a"], r["client_b"])
        ]
        by_block: dict[str, list[float]] = {}
        for row in rows:
            by_block.setdefault(row["block"], []).append(float(row["barrier"]))
        costs = {block: sum(values) / len(values) for block, values in by_block.items()}
        self.policy.decide(server_round, [costs] if costs else [], [1.0] if costs else [])
