"""AgentServerConfig: a mistake in how an agent serves fails where the config is written, with a message that
says what is wrong; a valid config is what the running server uses."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import MeshEnv


def _observer(*_args: Any) -> None:
    return None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"port": -1}, "port must be a whole number in 0..65535"),
        ({"port": 65536}, "port must be a whole number in 0..65535"),
        ({"port": 80.5}, "port must be a whole number in 0..65535"),
        ({"port": True}, "port must be a whole number in 0..65535"),
        ({"host": ""}, "host must be a host name or an IP address"),
        ({"host": "127.0.0.1:7001"}, "without a port"),
        ({"host": "::1"}, "IPv6 as [addr]"),
        ({"instance_id": "has space"}, "instance_id must match"),
        ({"instance_id": "-leading-dash"}, "instance_id must match"),
        ({"lease_ttl_s": 1}, "lease_ttl_s must be a whole number in 2..3600"),
        ({"lease_ttl_s": float("nan")}, "lease_ttl_s must be a whole number in 2..3600"),
        ({"lease_ttl_s": 2.5}, "lease_ttl_s must be a whole number in 2..3600"),
        ({"max_input_bytes": 0}, "max_input_bytes must be a whole number"),
        ({"max_input_bytes": float("nan")}, "max_input_bytes must be a whole number"),  # it turned the limit off
        ({"max_input_bytes": float("inf")}, "max_input_bytes must be a whole number"),
        ({"max_call_depth": float("nan")}, "max_call_depth must be a whole number"),
        ({"health_interval_s": float("inf")}, "health_interval_s must be in 0.05..3600"),
        ({"health_interval_s": 1e-9}, "health_interval_s must be in 0.05..3600"),
        ({"labels": {"": "x"}}, "labels must map non-empty strings to strings"),
        ({"labels": {"team": 7}}, "labels must map non-empty strings to strings"),
        ({"observers": ("not callable",)}, "observers must be callables"),
        ({"screen_exempt": "shout"}, "screen_exempt must be a sequence, not the single string 'shout'"),
        ({"screen_exempt": ("",)}, "screen_exempt must name capabilities"),
        ({"observers": "x"}, "observers must be a sequence"),
    ],
)
def test_a_bad_value_is_a_value_error_that_names_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        AgentServerConfig(**fields)
    assert message in str(info.value)


def test_good_values_are_kept_and_the_config_cannot_change_under_a_running_server() -> None:
    labels = {"team": "docs"}
    config = AgentServerConfig(host="[::1]", port=7001, instance_id="Echo-1.a_b", lease_ttl_s=2,
                               labels=labels, observers=[_observer], screen_exempt=["shout"])  # type: ignore[arg-type]
    assert (config.host, config.port, config.instance_id) == ("[::1]", 7001, "Echo-1.a_b")
    assert config.observers == (_observer,) and config.screen_exempt == ("shout",)  # lists become tuples
    labels["team"] = "changed"  # the caller's dict is copied ...
    assert dict(config.labels) == {"team": "docs"}
    with pytest.raises(TypeError):  # ... and the config's own is read-only
        config.labels["team"] = "x"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    assert AgentServerConfig().port == 0 and AgentServerConfig().content_screen is not None


async def test_the_server_registers_with_what_its_config_says(mesh_env: MeshEnv) -> None:
    config = AgentServerConfig(instance_id="echo-cfg-1", labels={"team": "docs"}, lease_ttl_s=3)
    async with AgentServer(EchoAgent("cfg"), await mesh_env.settings_for("echo"), config) as server:
        assert server.config is config and server.instance_id == "echo-cfg-1"
        async with MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            (instance,) = mesh.instances("echo")
            assert instance.instance_id == "echo-cfg-1"
            assert instance.labels["team"] == "docs"
            assert instance.endpoint == server.endpoint and server.port != 0
            out = await mesh.call("echo", {"text": "hi"}, timeout=10)
            assert out["served_by"] == "cfg"


@pytest.mark.parametrize("limit", [0, float("nan"), float("inf"), 1.5, True, 2**31])
def test_a_capabilitys_own_input_limit_must_be_a_whole_number_of_bytes(limit: Any) -> None:
    """Checked where the capability is declared: a NaN limit would have switched its size check off."""
    from hivemesh.sdk import Agent, capability

    with pytest.raises(ValueError, match="max_input_bytes must be a whole number of bytes"):
        class Odd(Agent):
            name = "odd"

            @capability(max_input_bytes=limit)
            async def echo(self, req: dict[str, Any]) -> dict[str, Any]:
                return req
