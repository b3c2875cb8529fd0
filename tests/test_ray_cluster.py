"""`federation.ray_address`: a run joins a real two-node Ray cluster (two raylets here); bad addresses."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sim_helpers import ROOT, cli_args, free_port, metrics, ray_cluster, run

from fedlayer.cli import main
from fedlayer.config import load_config
from fedlayer.processes import using
from fedlayer.run.files import SESSION_FILE
from fedlayer.simulation import backend_config, ray_address

DEFAULT = ROOT / "experiments" / "default.toml"
# `make test` runs these after the others, one at a time (they watch processes, signals or ports).
pytestmark = pytest.mark.serial


@pytest.fixture
def cluster() -> Iterator[tuple[str, str]]:
    """A head and a worker node, 1 CPU each; yields (address, temp dir). Stops only this cluster."""
    with ray_cluster(nodes=2, cpus=1) as found:
        yield found


def node_ids(temp: str) -> set[str]:
    """The node ids of the cluster's raylets (from their command lines)."""
    found = set()
    for proc in using(temp):
        if proc.name() == "raylet":
            found |= set(re.findall(r"--node_id=([0-9a-f]+)", " ".join(proc.cmdline())))
    return found


@pytest.mark.slow
def test_a_run_joins_a_two_node_cluster_and_equals_a_private_run(
    tiny_fmnist: Path, tmp_path: Path, cluster: tuple[str, str]
) -> None:
    address, temp = cluster
    nodes = node_ids(temp)
    assert len(nodes) == 2
    joined, private = tmp_path / "joined", tmp_path / "private"
    join = f"federation.ray_address='{address}'"
    run(cli_args(tiny_fmnist, joined, "federation.rounds=2", join), timeout=900)
    rows = raw_metrics(joined)
    assert all(len(row["client_nodes"]) == row["clients_trained"] for row in rows)  # one per train reply
    assert placements(rows) == nodes, "client work ran on both nodes"
    assert not (joined / SESSION_FILE).exists(), "a joined cluster is not recorded as the run's own"
    assert node_ids(temp) == nodes, "fedlayer never stops a cluster it joined"

    run(cli_args(tiny_fmnist, private, "federation.rounds=2"), timeout=900)
    assert placements(raw_metrics(private)).isdisjoint(nodes), "the default is a private Ray, not the cluster"
    assert metrics(joined) == metrics(private)  # CPU determinism: same results wherever the clients ran


def raw_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def placements(rows: list[dict[str, Any]]) -> set[str]:
    return {node for row in rows for node in row["client_nodes"].values()}


def test_ray_address_is_the_config_key_else_ray_address_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = load_config(DEFAULT, [])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(cfg) == ""
    assert backend_config(cfg)["init_args"]["num_cpus"] == os.cpu_count()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_address(cfg) == "10.0.0.1:6379"
    assert "num_cpus" not in backend_config(cfg)["init_args"]  # the cluster brings its own
    cfg.federation.ray_address = "auto"
    assert ray_address(cfg) == "auto"


@pytest.mark.parametrize(
    ("address", "fragment"), [("nonsense", "is not allowed; use"), (None, "no Ray cluster answers at")]
)
def test_a_cluster_that_cannot_be_joined_is_one_line_before_anything_is_written(
    address: str | None, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = address or f"127.0.0.1:{free_port()}"  # nothing listens there any more
    out = tmp_path / "run"
    assert main(["run", str(DEFAULT), "--out", str(out), "--set", f"federation.ray_address='{address}'"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fedlayer: error: federation.ray_address (or RAY_ADDRESS): ") and fragment in line
    assert not out.exists()
