"""The A2A mapping's pure parts: mesh names from card names, card URLs, message parts to JSON input."""

from __future__ import annotations

import pytest
from a2a.helpers import new_data_part, new_text_part
from a2a.types import Message, Role
from a2a.utils.errors import InvalidParamsError

from hivemesh.mesh.errors import InvalidInputError
from hivemesh.sdk.a2a.bridge import card_url, mesh_name, mesh_version
from hivemesh.sdk.a2a.cards import BEARER_SCHEME, MTLS_SCHEME, build_card
from hivemesh.sdk.a2a.executor import payload_of
from hivemesh.v1 import agent_pb2


def _msg(*parts: object) -> Message:
    return Message(role=Role.ROLE_USER, message_id="m", parts=list(parts))  # type: ignore[arg-type]


def test_mesh_names_from_a2a_names() -> None:
    assert mesh_name("Text Tools") == "text-tools"
    assert mesh_name("currency_converter/v2") == "currency_converter-v2"
    with pytest.raises(InvalidInputError):
        mesh_name("!!!")


def test_mesh_versions_from_a2a_versions_are_what_the_registry_takes() -> None:
    """An external card's version is free text; the registry takes [0-9A-Za-z.+_-]{0,64} (a bridged agent with
    another version could not register)."""
    from hivemesh.mesh.registry import instance_violations
    from hivemesh.v1 import mesh_pb2

    cases = {"1.0 beta": "1.0-beta", "": "0.0.0", "2.0.0-rc.1+build.5": "2.0.0-rc.1+build.5",
             "\x1b[2Jv1": "2Jv1", "v" * 100: "v" * 64, "!!!": "0.0.0"}
    assert {v: mesh_version(v) for v in cases} == cases
    for version in cases.values():
        instance = mesh_pb2.AgentInstance(instance_id="i-1", endpoint="127.0.0.1:1")
        instance.card.name, instance.card.version = "bridged", version
        instance.card.capabilities.add(name="c")
        assert "card.version" not in instance_violations(instance), version


def test_card_urls() -> None:
    assert card_url("https://a.example/") == "https://a.example/.well-known/agent-card.json"
    assert card_url("https://a.example/cards/x.json") == "https://a.example/cards/x.json"


def test_message_parts_become_json_input() -> None:
    # protobuf's Value holds numbers as doubles: whole numbers come back as ints, fractions stay floats.
    assert payload_of(_msg(new_data_part({"a": 2, "b": [1, 2.5]}))) == {"a": 2, "b": [1, 2.5]}
    assert type(payload_of(_msg(new_data_part({"a": 2})))["a"]) is int
    assert payload_of(_msg(new_text_part('{"text": "hi"}'))) == {"text": "hi"}
    assert payload_of(_msg(new_text_part("plain words"))) == {"text": "plain words"}
    assert payload_of(_msg(new_text_part("x"), new_data_part([1]))) == [1]  # the data part wins
    with pytest.raises(InvalidParamsError):
        payload_of(_msg())


def test_cards_require_certificate_and_token_together() -> None:
    cap = agent_pb2.Capability(name="echo", input_schema='{"type": "object"}', streaming=True)
    card = build_card(name="g", description="d", url="https://h/", version="1", offered=[(cap, ("echo",))],
                      gateway_audience="spiffe://td/agent/g")
    assert [set(r.schemes) for r in card.security_requirements] == [{MTLS_SCHEME, BEARER_SCHEME}]
    assert card.security_schemes[BEARER_SCHEME].http_auth_security_scheme.scheme == "Bearer"
    assert card.skills[0].id == "echo" and list(card.skills[0].tags) == ["agent:echo"]
    params = card.capabilities.extensions[0].params
    assert params["skills"]["echo"]["streaming"] is True
