"""Which blocks the server shares in a round: the interface of a sharing policy, and the fixed one.

A policy tells the mechanism (:class:`strategies.mechanism.PartialStrategy`) the shared set of every round
and, for a dynamic policy, in which rounds clients measure or send every block up. The fixed policy shares
one set for the whole run; barrier-guided sharing is :mod:`strategies.lmc`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from fedlayer.contract import COST_PREFIX


@dataclass
class SharingPolicy:
    """The blocks shared in each round; this base class shares one fixed set for the whole run.

    Parameters
    ----------
    blocks : dict[str, list[str]]
        Every block of the model (module path -> its state-dict keys), in model order.
    shared : Sequence[str]
        The blocks shared (before any measurement, for :class:`LmcPolicy`).
    """

    blocks: dict[str, list[str]]
    shared: Sequence[str]
    evidence_prefixes: ClassVar[tuple[str, ...]] = (
        COST_PREFIX,
    )  # reply metrics "<prefix><block>" that decide

    def __post_init__(self) -> None:
        self.shared = [block for block in self.blocks if block in set(self.shared)]

    @property
    def dynamic(self) -> bool:
        """Whether the shared set can change during the run (logged per round when it can)."""
        return False

    def shared_blocks(self) -> list[str]:
        return list(self.shared)

    def shared_keys(self) -> list[str]:
        return [key for block in self.shared_blocks() for key in self.blocks[block]]

    def measures(self, server_round: int) -> bool:
        """Whether ``server_round`` is a decision round (clients send every block up)."""
        return False

    def clients_measure(self, server_round: int) -> bool:
        """Whether clients measure their sharing costs in ``server_round``."""
        return False

    def collects(self, server_round: int) -> bool:
        """Whether clients send every block up in ``server_round`` so that the server averages the personal
        ones (the reference of the next measurement, the start of a block that turns shared)."""
        return False

    def reference_keys(self, personal: Sequence[str]) -> list[str]:
        """Of the round's ``personal`` keys, those whose server value is sent down as the reference."""
        return list(personal)

    def record(self, server_round: int) -> None:
        """Remember the set configured for ``server_round`` (a fixed policy has nothing to remember)."""

    def decide(
        self, server_round: int, client_costs: Sequence[Mapping[str, float]], weights: Sequence[float]
    ) -> None:
        """Set the next rounds' shared set from the evidence (costs, weights) of ``server_round`` (fixed:
        no-op)."""

    def evidence_of(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """A reply's evidence, block -> value, from its metrics named ``<prefix><block>``."""
        return {
            key[len(prefix) :]: float(value)
            for key, value in metrics.items()
            for prefix in self.evidence_prefixes
            if key.startswith(prefix)
        }

    def state(self) -> dict[str, Any]:
        """What a checkpoint must hold to continue the run exactly."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (resume)."""
