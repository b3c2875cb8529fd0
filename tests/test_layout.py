"""The tree shows the architecture: which side may import what, and no import circles.

Layers, lowest first: the contract layer (config, contract, models, layers, run.files), the data and torch
helpers (data, training, experiment, flower, processes, run.atomic), the analysis maths, the aggregation side
(``strategies``, which reaches into fedlayer's contract layer only), the run files, the client side and the
server side (peers: neither imports the other, except that the server prunes the clients' store in
simulation), and on top the commands (simulation, deploy, compare, inputs, cli). Imports inside functions
count; imports under ``TYPE_CHECKING`` count for the layers, not for circles (they never run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedlayer", "strategies")
CONTRACT_LAYER = (
    "fedlayer.config",
    "fedlayer.contract",
    "fedlayer.models",
    "fedlayer.layers",
    "fedlayer.run.files",
)
BELOW_SIDES = (
    "fedlayer.data",
    "fedlayer.training",
    "fedlayer.experiment",
    "fedlayer.flower",
    "fedlayer.processes",
    "fedlayer.run.atomic",  # the one write layer of every file a run writes
)
COMMANDS = ("fedlayer.simulation", "fedlayer.deploy", "fedlayer.compare", "fedlayer.inputs", "fedlayer.cli")
SIDES = ("fedlayer.client", "fedlayer.server", "strategies")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports(path: Path, *, runtime_only: bool = False) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts as a.b, and a.b.c if a module)."""
    known = modules()
    found: set[str] = set()

    def visit(node: ast.AST) -> Iterator[ast.AST]:
        for child in ast.iter_child_nodes(node):
            if runtime_only and isinstance(child, ast.If) and _type_checking(child):
                continue
            yield child
            yield from visit(child)

    for node in visit(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known.keys()
            if len(submodules) < len(node.names):  # names defined by the module itself, not submodules
                found.add(node.module)
            found |= submodules
    return {name for name in found if name in known}


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(allowed: dict[tuple[str, ...], tuple[str, ...]]) -> list[str]:
    """``importer prefixes -> importable prefixes``: every import of a project module outside them."""
    found = []
    for name, path in modules().items():
        for rule, ok in allowed.items():
            if within(name, rule):
                found += [f"{name} imports {m}" for m in sorted(imports(path)) if not within(m, ok + rule)]
    return found


def test_strategies_import_only_the_contract_layer_of_fedlayer() -> None:
    assert violations({("strategies",): CONTRACT_LAYER}) == []


def test_the_analysis_maths_needs_neither_flower_nor_ray_nor_any_side() -> None:
    assert violations({("fedlayer.analysis",): ("fedlayer.config",)}) == []
    for path in (ROOT / "fedlayer" / "analysis").rglob("*.py"):
        text = path.read_text()
        assert "import flwr" not in text and "from flwr" not in text and "import ray" not in text, path


def test_lower_layers_never_import_a_higher_one() -> None:
    lowest = CONTRACT_LAYER + BELOW_SIDES
    assert violations({CONTRACT_LAYER: CONTRACT_LAYER, BELOW_SIDES: lowest}) == []
    assert violations({("fedlayer.run",): (*lowest, "fedlayer.analysis")}) == []


def test_client_and_server_sides_do_not_import_each_other() -> None:
    base = (*CONTRACT_LAYER, *BELOW_SIDES, "fedlayer.analysis", "strategies")
    server = (*base, "fedlayer.run", "fedlayer.client.store")  # the server prunes the clients' store
    assert violations({("fedlayer.client",): base, ("fedlayer.server",): server}) == []


@pytest.mark.parametrize("side", SIDES)
def test_nothing_below_the_commands_imports_them(side: str) -> None:
    found = [
        f"{name} imports {m}"
        for name, path in modules().items()
        if within(name, (side,))
        for m in imports(path)
        if within(m, COMMANDS)
    ]
    assert found == []


def test_no_import_circles() -> None:
    graph = {name: imports(path, runtime_only=True) - {name} for name, path in modules().items()}
    # a package's __init__ imported through one of its modules is not a circle of the code
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_every_algorithm_names_client_parts_that_exist() -> None:
    """One hop from a declaration: its recipe and personalization are functions of the client's recipes."""
    from fedlayer.client import recipes
    from strategies import ALGORITHMS

    for algorithm in ALGORITHMS.values():
        assert recipes.RECIPES[algorithm.recipe].__name__ == algorithm.recipe
        assert recipes.PERSONALIZATIONS[algorithm.personalization].__name__ == algorithm.personalization
