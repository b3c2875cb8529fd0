"""The container files, read as files: non-root image, each service mounts only what it uses.

(The compose deployments themselves run in tests/test_docker.py, which needs a Docker daemon.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def services(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((DOCKER / name).read_text())["services"])


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host file name (the last part of the host path) of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        host, container, *_ = re.sub(r"\$\{[^}]*\}", "HOST", volume).split(":")
        found[container] = Path(host).name
    return found


def test_the_image_runs_as_an_unprivileged_user() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    instructions = [line.split()[0] for line in text.splitlines() if line[:1].isupper()]
    final_stage = instructions[len(instructions) - instructions[::-1].index("FROM") :]
    assert final_stage[-1] == "USER", "USER must come after the last RUN of the final stage"
    assert "USER fedlayer" in text


def test_data_is_mounted_read_only_and_nothing_else_but_results_and_personal_state() -> None:
    for name, service in services("compose.yml").items():
        for volume in service.get("volumes", []):
            own_state = name.startswith("clientapp-") and volume == f"state-{name[-1]}:/state"
            assert volume.endswith(":/data:ro") or volume.endswith(":/results") or own_state, (name, volume)


def test_each_data_holder_keeps_its_personal_layers_in_its_own_volume() -> None:
    """The image's working directory is not writable by its user: state-dir must point at the volume."""
    for overlay in ("compose.yml", "with-tls.yml", "with-auth.yml"):
        for i in range(2):
            command = services(overlay)[f"supernode-{i}"]["command"]
            assert any(c.startswith("--node-config=") and 'state-dir="/state"' in c for c in command), overlay
    for i in range(2):
        assert f"state-{i}:/state" in services("compose.yml")[f"clientapp-{i}"]["volumes"]


def test_tls_overlay_gives_each_service_only_its_files() -> None:
    tls = services("with-tls.yml")
    assert set(mounts(tls["superlink"]).values()) == {"ca.crt", "server.pem", "server.key"}
    for name in ("serverapp", "supernode-0", "supernode-1"):
        assert mounts(tls[name]) == {"/certs/ca.crt": "ca.crt"}, name
    assert "clientapp-0" not in tls and "clientapp-1" not in tls  # they talk HTTP to their SuperNode only


def test_auth_overlay_gives_each_supernode_only_its_own_key() -> None:
    auth = services("with-auth.yml")
    assert "--enable-supernode-auth" in auth["superlink"]["command"]
    for i in range(2):
        node = auth[f"supernode-{i}"]
        assert mounts(node) == {f"/keys/supernode-{i}.key": f"supernode-{i}.key"}
        assert f"--auth-supernode-private-key=/keys/supernode-{i}.key" in node["command"]
        assert node["depends_on"] == {"register": {"condition": "service_completed_successfully"}}
    assert set(mounts(auth["register"]).values()) == {"ca.crt", "supernode-0.pub", "supernode-1.pub"}
    every_mount = [m for name in ("compose.yml", "with-tls.yml", "with-auth.yml") for m in _all(name)]
    assert not [m for m in every_mount if m in ("ca.key", "certs", "keys")]


def _all(name: str) -> list[str]:
    return [file for service in services(name).values() for file in mounts(service).values()]
