"""A sidecar fronts an agent or serves a caller, exactly one; its ready line names each port for what it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemesh.mesh.settings import MeshSettings
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig


@pytest.mark.parametrize("kwargs", [{}, {"agent": "127.0.0.1:7001", "client": "billing"}])
def test_an_agent_or_a_client_exactly_one(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"give agent .* or client .*, exactly one"):
        SidecarConfig(**kwargs)


@pytest.mark.parametrize(("field", "value"), [
    ("max_input_bytes", float("nan")), ("max_input_bytes", 0), ("max_input_bytes", -5), ("lease_ttl_s", 2.5),
    ("max_held_calls", float("inf")), ("max_call_depth", float("nan")), ("limits", (("echo", float("nan")),)),
    ("health_interval_s", float("inf")), ("agent_wait_s", float("nan")),
])
def test_numbers_out_of_their_range_are_refused_naming_the_field(field: str, value: object) -> None:
    """Checked as whole numbers (or finite seconds), not with `<`: NaN passes every comparison, and a NaN or
    negative input limit left the sidecar's size check off."""
    with pytest.raises(ValueError, match=r"must be (a whole number in|in) "):
        SidecarConfig(agent="127.0.0.1:7001", **{field: value})  # type: ignore[arg-type]


def _sidecar(config: SidecarConfig) -> Sidecar:
    return Sidecar(config, MeshSettings(etcd="127.0.0.1:2379", controlplane="127.0.0.1:1", join="127.0.0.1:2",
                                        ca_bundle=Path("ca.pem"), trust_domain="hivemesh.local"))


def test_ready_lines() -> None:
    agent = _sidecar(SidecarConfig(agent="127.0.0.1:7001"))
    agent.port, agent.mesh_socket = 40001, Path("/run/a/mesh.sock")
    # Not started: no node, so no metrics port yet.
    assert agent.ready_line == "sidecar ready inbound=127.0.0.1:40001 mesh=unix:/run/a/mesh.sock metrics=off"
    caller = _sidecar(SidecarConfig(client="billing", mesh_listen="127.0.0.1:0"))
    caller.mesh_port = 40002
    assert caller.ready_line == "sidecar ready mesh=127.0.0.1:40002 metrics=off"  # no inbound port at all
