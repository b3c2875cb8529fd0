"""What fedlayer depends on in Flower beyond its public API (``fedlayer/flower.py``), checked against the
installed Flower: a Flower upgrade that changes one of these fails here, by name, before it fails a run."""

from __future__ import annotations

import ast
import inspect
import logging
from importlib.metadata import version
from pathlib import Path

import pytest
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.serverapp import strategy as fl
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedlayer import flower

ROOT = Path(__file__).resolve().parents[1]
# Flower's public API as fedlayer uses it; any other flwr module is an internal, allowed in flower.py only.
PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.common.logger")


def test_flower_is_the_version_these_internals_were_read_from() -> None:
    assert version("flwr").startswith("1.42."), (
        f"flwr {version('flwr')}: re-read every internal named in fedlayer/flower.py, then update this test"
    )


def test_the_engine_delivery_loop_has_the_signature_fedlayer_replaces() -> None:
    params = list(inspect.signature(vce_api.add_messages_to_queue).parameters)
    assert params == ["state", "queue", "nodes_mapping", "f_stop"]
    with flower.deliver_to_waiting_nodes():
        assert vce_api.add_messages_to_queue is flower.add_waiting_messages_to_queue
    assert vce_api.add_messages_to_queue is flower._FLOWER_LOOP  # restored


def test_simulation_registers_partition_i_as_the_ith_node() -> None:
    """What :func:`fedlayer.flower.simulated_partitions` reads off the LinkState without a message."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = vce_api._register_nodes(5, factory)
    grid = InMemoryGrid(factory)
    assert isinstance(grid.state, InMemoryLinkState)
    assert flower.is_simulation(grid)
    assert flower.simulated_partitions(grid, 5, timeout=1) == mapping
    with grid.state.lock:  # what waiting_nodes reads
        assert grid.state.message_ins_store == {}
    assert "limit" in inspect.signature(InMemoryLinkState.get_message_ins).parameters


def test_strategy_state_attributes_exist_on_flowers_optimizers() -> None:
    common = {"fraction_train": 1.0}
    attributes = {name for cls in (fl.FedAvgM, fl.FedAdam) for name in vars(cls(**common))}
    assert set(flower.STRATEGY_STATE) <= attributes


def test_the_in_process_entry_point_takes_what_fedlayer_passes() -> None:
    from flwr.simulation import run_simulation

    params = inspect.signature(run_simulation).parameters
    assert {"server_app", "client_app", "num_supernodes", "backend_config"} <= params.keys()
    assert inspect.signature(flower.run_in_process).parameters.keys() <= params.keys()


def test_flowers_logger_and_actor_names_are_the_ones_fedlayer_uses() -> None:
    from flwr.common.logger import log
    from flwr.simulation.ray_transport.ray_actor import ClientAppActor

    assert getattr(log, "__self__", None) is logging.getLogger(flower.LOGGER)  # flower.log collects it
    assert f"ray::{ClientAppActor.__ray_metadata__.class_name}" == flower.CLIENT_ACTOR


def _flwr_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name == "flwr" or name.startswith("flwr.")}


@pytest.mark.parametrize("package", ["fedlayer", "strategies"])
def test_flower_internals_are_reached_from_flower_py_only(package: str) -> None:
    internal = {
        str(path.relative_to(ROOT)): sorted(m for m in _flwr_imports(path) if not m.startswith(PUBLIC))
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "fedlayer" / "flower.py"
    }
    assert {path: mods for path, mods in internal.items() if mods} == {}
