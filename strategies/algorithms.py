"""Algorithms as declarations: which blocks are shared, how they are aggregated, what clients do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedlayer.config import ConfigError, StrategyConfig

STATELESS_AGGREGATORS = ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg")

if TYPE_CHECKING:  # the declarations stay importable without torch (config validation)
    from fedlayer.layers import Selector


@dataclass(frozen=True)
class Algorithm:
    """One personalization algorithm.

    Server part: ``shared`` are selector patterns of the blocks the server averages (``None``: taken from
    ``strategy.shared``, for personalization averaging), ``exclude`` blocks always kept personal,
    ``aggregator`` a Flower aggregator it requires (:mod:`strategies.aggregators`; ``None``:
    ``strategy.aggregator``), ``dynamic`` a shared set that changes during the run (:mod:`strategies.lmc`).
    Client part: ``recipe`` is the function of that name in ``fedlayer/client/recipes.py`` (the local
    training), ``personalization`` the function there that gives the model a client evaluates as its own.
    ``state`` names the client state the recipe keeps across rounds beside the personal keys (Ditto's
    personal model, FedALA's mixing weights): tensors ``task.state["<name>.<key>"]``, saved in the client's
    :class:`fedlayer.client.store.PersonalStore` file under ``state.<name>.<key>``; never sent.
    ``extension`` names an entry of ``EXTENSIONS`` in ``fedlayer/models.py``: modules added to any model with
    head / body groups, on the server and the clients (FedRoD's second head); ``shared`` / ``exclude`` say
    which of its blocks are shared. ``per_client``: besides the global model the server sends each client a
    model of its own, from what the clients sent up (FedCAC: :mod:`strategies.fedcac`).
    """

    name: str
    shared: tuple[str, ...] | None
    summary: str
    exclude: tuple[str, ...] = ()
    recipe: str = "sgd"
    personalization: str = "as_is"
    aggregator: str | None = None
    dynamic: bool = False  # the shared set changes during the run (lmc); `shared` is the initial set
    state: tuple[str, ...] = ()  # client state the recipe keeps across rounds (never sent)
    extension: str | None = None  # modules added to the model (fedlayer.models.EXTENSIONS)
    per_client: bool = False  # the server sends each client its own customized model (strategies/fedcac.py)

    @property
    def fixed_split(self) -> bool:
        """A set of shared blocks and nothing else: no client state, extension, per-client model or shared
        set that changes (FedAvg, FedProx, FedPer, LG-FedAvg, FedBN, FedRep, FedBABU, local, partial)."""
        return not (self.dynamic or self.state or self.extension or self.per_client)

    def selector(self, strategy: StrategyConfig) -> Selector:
        from fedlayer.layers import Selector

        include = tuple(strategy.shared) if self.shared is None else self.shared
        if self.dynamic and not include:
            include = _ALL
        return Selector(include=list(include), exclude=list(self.exclude) + list(strategy.exclude))


_ALL = ("*",)
ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("fedavg", _ALL, "every block averaged (McMahan et al., 2017)"),
        Algorithm(
            "fedprox",
            _ALL,
            "FedAvg + proximal term on shared params (Li et al., 2020)",
            recipe="fedprox",
            aggregator="fedprox",
        ),
        Algorithm("fedper", ("group:body",), "body averaged, head personal (Arivazhagan et al., 2019)"),
        Algorithm("lgfedavg", ("group:head",), "head averaged, body personal (Liang et al., 2020)"),
        Algorithm(
            "fedbn",
            _ALL,
            "norm layers incl. running stats personal (Li et al., 2021)",
            exclude=("type:norm",),
        ),
        Algorithm(
            "fedrep",
            ("group:body",),
            "head epochs then body epochs; body averaged (Collins et al., 2021)",
            recipe="fedrep",
        ),
        Algorithm(
            "fedbabu",
            ("group:body",),
            "head frozen at init, fine-tuned to evaluate (Oh et al., 2022)",
            recipe="fedbabu",
            personalization="finetune",
        ),
        Algorithm(
            "ditto",
            _ALL,
            "FedAvg model + a personal model pulled toward it by mu/2 ||v - w||^2 (Li et al., 2021)",
            recipe="ditto",
            personalization="personal_model",
            state=("personal",),
        ),
        Algorithm(
            "fedala",
            _ALL,
            "adaptive local aggregation: learned element-wise mix of global into local (Zhang et al., 2023)",
            recipe="fedala",
            personalization="ala_mixed",
            state=("local", "ala_weights"),
        ),
        Algorithm(
            "fedrod",
            _ALL,
            "generic head on a balanced softmax + personal head on its features (Chen & Chao, 2022)",
            exclude=("rod_head",),
            recipe="fedrod",
            extension="rod_head",
        ),
        Algorithm(
            "feddbe",
            _ALL,
            "personal bias on the features + their mean pulled to the global mean (Zhang et al., 2023)",
            exclude=("dbe_bias",),
            recipe="feddbe",
            state=("dbe_global",),
            extension="dbe",
        ),
        Algorithm(
            "fedcac",
            _ALL,
            "FedAvg + each client's critical parameters averaged only with clients whose critical sets "
            "overlap (Wu et al., 2023)",
            recipe="fedcac",
            personalization="cac_customized",
            state=("critical",),
            per_client=True,
        ),
        Algorithm(
            "fedcp",
            _ALL,
            "a policy splits each feature between a personal and the global head; body pulled to the "
            "received one by an MMD term (Zhang et al., 2023)",
            exclude=("cp_head",),
            recipe="fedcp",
            extension="cp",
        ),
        Algorithm(
            "gpfl",
            _ALL,
            "conditional valve on the features: personal head on their personalized view, a shared class "
            "embedding on their generic one (Zhang et al., 2023)",
            exclude=("group:head", "gpfl_inputs"),
            recipe="gpfl",
            extension="gpfl",
        ),
        Algorithm("local", (), "nothing averaged: independent local training"),
        Algorithm(
            "partial", None, "personalization averaging: strategy.shared blocks averaged (Adilova et al.)"
        ),
        Algorithm(
            "lmc",
            None,
            "barrier-guided: blocks whose measured sharing cost is low (or, lmc_criterion = 'mixing', whose "
            "learned mixing weight is high; 'shadow': tail blocks whose shadow in the other regime loses) "
            "are averaged (server: strategies/lmc.py; clients: fedlayer/client/lmc.py, shadow.py)",
            dynamic=True,
            # lmc_criterion "mixing" / "shadow": the learned weight per block; the tail's shadows, their roles
            state=("mix", "shadow", "shadow_role"),
        ),
    )
}


def is_fixed_split(name: str) -> bool:
    """Whether the algorithm ``name`` is a fixed split (:attr:`Algorithm.fixed_split`); reports use it."""
    return name in ALGORITHMS and ALGORITHMS[name].fixed_split


def get_algorithm(strategy: StrategyConfig) -> Algorithm:
    """The declared algorithm ``strategy.name``, with its config checked."""
    if strategy.name not in ALGORITHMS:
        raise ConfigError(
            f"strategy.name: {strategy.name!r} is not allowed; choose one of: {', '.join(ALGORITHMS)}"
        )
    algorithm = ALGORITHMS[strategy.name]
    if algorithm.shared is None and not strategy.shared and not algorithm.dynamic:
        raise ConfigError(
            "strategy.shared: must list at least one block pattern for strategy.name = 'partial'"
        )
    if algorithm.shared is not None and strategy.shared:
        raise ConfigError(
            f"strategy.shared: only used by strategy.name = 'partial' or 'lmc', not {strategy.name!r}"
        )
    if algorithm.dynamic and strategy.aggregator not in STATELESS_AGGREGATORS:
        raise ConfigError(
            f"strategy.aggregator: {strategy.aggregator!r} is not allowed with strategy.name = "
            f"{strategy.name!r} (its server state cannot follow a changing shared set); choose one of: "
            + ", ".join(STATELESS_AGGREGATORS)
        )
    return algorithm


def aggregator_name(strategy: StrategyConfig) -> str:
    algorithm = get_algorithm(strategy)
    return algorithm.aggregator or strategy.aggregator
