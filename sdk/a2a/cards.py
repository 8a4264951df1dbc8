"""Agent cards for the A2A gateway, built from the registry: skills are capabilities with their schemas.

A2A's `AgentSkill` has no field for JSON schemas, so the card carries them in an agent extension
(`SCHEMAS_EXTENSION`, params `{"skills": {id: {"input_schema", "output_schema", "streaming"}}}`): an A2A
client that knows it validates before sending; one that does not still sees every skill.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    MutualTlsSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
)
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, TransportProtocol
from google.protobuf import struct_pb2
from google.protobuf.json_format import ParseDict

from hivemesh.mesh import json_depth
from hivemesh.v1 import agent_pb2, mesh_pb2

SCHEMAS_EXTENSION = "https://hivemesh.dev/a2a/skill-schemas/v1"
MTLS_SCHEME = "meshMtls"
BEARER_SCHEME = "meshBearer"
JSON = "application/json"

Offered = list[tuple[agent_pb2.Capability, tuple[str, ...]]]
"""(capability, the agents serving it) for what one card offers."""


def _schema(text: str) -> Any:
    try:
        return json_depth.loads(text) if text else {}
    except (json.JSONDecodeError, RecursionError):
        return {}


def skill_of(capability: agent_pb2.Capability, agents: Iterable[str]) -> AgentSkill:
    agents = list(agents)
    return AgentSkill(
        id=capability.name,
        name=capability.name,
        description=capability.description or f"{capability.name} (served by {', '.join(agents)})",
        tags=[*capability.tags, *(f"agent:{a}" for a in agents)],
        input_modes=list(capability.input_modes) or [JSON],
        output_modes=list(capability.output_modes) or [JSON],
    )


def security_schemes(gateway_audience: str) -> dict[str, SecurityScheme]:
    """How an A2A caller authenticates: a mesh client certificate AND a bearer token the control plane issued
    for the gateway's audience, bound to that certificate (one security requirement names both)."""
    return {
        MTLS_SCHEME: SecurityScheme(mtls_security_scheme=MutualTlsSecurityScheme(
            description="A client certificate issued by the mesh CA (a workload identity: spiffe://<td>/<kind>/<name>)",
        )),
        BEARER_SCHEME: SecurityScheme(http_auth_security_scheme=HTTPAuthSecurityScheme(
            scheme="Bearer", bearer_format="JWT",
            description=f"A capability token from the control plane's IssueToken for audience {gateway_audience}, "
                        "bound to the client certificate (RFC 8705); its scopes are the skills it may call",
        )),
    }


def build_card(
    *, name: str, description: str, url: str, version: str, offered: Offered, gateway_audience: str,
) -> AgentCard:
    """An A2A agent card offering capabilities at url (its JSON-RPC endpoint)."""
    schemas = {
        c.name: {"input_schema": _schema(c.input_schema), "output_schema": _schema(c.output_schema),
                 "streaming": c.streaming}
        for c, _ in offered
    }
    card = AgentCard(
        name=name,
        description=description,
        version=version,
        supported_interfaces=[AgentInterface(url=url, protocol_binding=TransportProtocol.JSONRPC,
                                             protocol_version=PROTOCOL_VERSION_CURRENT)],
        capabilities=AgentCapabilities(
            streaming=True, push_notifications=False,
            extensions=[AgentExtension(uri=SCHEMAS_EXTENSION, description="JSON Schemas of each skill's input and "
                                       "output (skill id -> schemas)",
                                       params=ParseDict({"skills": schemas}, struct_pb2.Struct()))],
        ),
        default_input_modes=[JSON, "text/plain"],
        default_output_modes=[JSON, "text/plain"],
        skills=[skill_of(c, agents) for c, agents in offered],
    )
    for key, scheme in security_schemes(gateway_audience).items():
        card.security_schemes[key].CopyFrom(scheme)
    both = SecurityRequirement()
    both.schemes[MTLS_SCHEME].SetInParent()
    both.schemes[BEARER_SCHEME].SetInParent()
    card.security_requirements.append(both)
    return card


def offered_by(instances: Iterable[mesh_pb2.AgentInstance], agent: str | None) -> Offered:
    """What agent (None: every agent) offers now, from the live instances in the registry."""
    found: dict[str, tuple[agent_pb2.Capability, set[str]]] = {}
    for inst in instances:
        if agent is not None and inst.card.name != agent:
            continue
        for cap in inst.card.capabilities:
            found.setdefault(cap.name, (cap, set()))[1].add(inst.card.name)
    return [(cap, tuple(sorted(names))) for _, (cap, names) in sorted(found.items())]
