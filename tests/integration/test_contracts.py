"""Contracts that hold both ways over the real mesh, in both packagings (an SDK agent; a plain gRPC agent
behind a `Sidecar`): a JSON Schema 2020-12 input schema is enforced by its own rules, and an answer (or a
stream item) that breaks the declared output schema never reaches the caller: it becomes AGENT_ERROR with
reason INVALID_OUTPUT and the field path, and the decision observers and the audit log record it so."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.mesh.errors import AgentError, HivemeshError, InvalidInputError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.schema import SchemaError
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient, capability
from hivemesh.v1 import agent_pb2, agent_pb2_grpc
from tests.support.meshenv import MeshEnv

_JSON = "application/json"
D2020 = "https://json-schema.org/draft/2020-12/schema"
IN = {
    "$schema": D2020,
    "type": "object",
    "required": ["line"],
    "properties": {
        # prefixItems and $defs: a draft-07 reader ignores both and lets ["x", 0] and [1, 1] through.
        "line": {"type": "array", "prefixItems": [{"type": "string"}, {"$ref": "#/$defs/qty"}]},
        "bad": {"type": "boolean"},
    },
    "$defs": {"qty": {"type": "integer", "minimum": 1}},
}
OUT = {"$schema": D2020, "type": "object", "required": ["price"],
       "properties": {"price": {"type": "number", "minimum": 0}}}
ITEM = {"$schema": D2020, "type": "integer"}


def _answer(value: dict[str, Any]) -> dict[str, Any]:
    return {"price": "free"} if value.get("bad") else {"price": 10 * value["line"][1]}


def _items(value: dict[str, Any]) -> list[Any]:
    return [1, 2, "three"] if value.get("bad") else [1, 2, 3]


class Quoter(Agent):
    """The SDK packaging."""

    name = "quoter"

    @capability(name="quote", input_schema=IN, output_schema=OUT)
    async def quote(self, req: dict[str, Any]) -> dict[str, Any]:
        return _answer(req)

    @capability(name="quote-items", input_schema=IN, output_schema=ITEM)
    async def quote_items(self, req: dict[str, Any]) -> AsyncIterator[Any]:
        for item in _items(req):
            yield item


class PlainQuoter(agent_pb2_grpc.AgentServicer):
    """The sidecar packaging: generated stubs only, the same contract under other names."""

    def __init__(self, output_schema: dict[str, Any] = OUT) -> None:
        self.output_schema = output_schema
        self.port = 0
        self._server: grpc.aio.Server | None = None

    def card(self) -> agent_pb2.AgentCard:
        return agent_pb2.AgentCard(name="pquoter", capabilities=[
            agent_pb2.Capability(name="p-quote", input_schema=json.dumps(IN),
                                 output_schema=json.dumps(self.output_schema)),
            agent_pb2.Capability(name="p-quote-items", input_schema=json.dumps(IN), output_schema=json.dumps(ITEM),
                                 streaming=True),
        ])

    async def Describe(self, request: Any, context: Any) -> agent_pb2.AgentCard:
        return self.card()

    async def Invoke(self, request: agent_pb2.InvokeRequest, context: Any) -> agent_pb2.InvokeResponse:
        value = json.loads(request.input)
        out: Any = _items(value) if request.capability.endswith("-items") else _answer(value)
        return agent_pb2.InvokeResponse(output=json.dumps(out).encode(), content_type=_JSON,
                                        state=agent_pb2.TASK_STATE_COMPLETED)

    async def InvokeStream(self, request: agent_pb2.InvokeRequest, context: Any) -> AsyncIterator[Any]:
        for item in _items(json.loads(request.input)):
            yield agent_pb2.InvokeChunk(data=json.dumps(item).encode(), content_type=_JSON,
                                        state=agent_pb2.TASK_STATE_WORKING)
        yield agent_pb2.InvokeChunk(final=True, state=agent_pb2.TASK_STATE_COMPLETED)

    async def __aenter__(self) -> PlainQuoter:
        server = grpc.aio.server()
        agent_pb2_grpc.add_AgentServicer_to_server(self, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop(0.5)


@dataclass
class Rig:
    mesh: MeshClient
    sdk: AgentServer
    sidecar: Sidecar
    seen: list[tuple[str, str]]
    """(capability, reason) of every refusal the decision observers heard of, both packagings."""


@pytest.fixture
async def rig(mesh_env: MeshEnv, tmp_path: Path) -> AsyncIterator[Rig]:
    seen: list[tuple[str, str]] = []

    def observe(call: Inbound, err: HivemeshError | None, code: grpc.StatusCode, elapsed: float) -> None:
        if err is not None and call.request is not None:
            seen.append((call.request.capability, err.reason))

    async with PlainQuoter() as plain:
        sidecar = Sidecar(SidecarConfig(agent=f"127.0.0.1:{plain.port}", audit_dir=str(tmp_path / "sc-audit")),
                          await mesh_env.settings_for("pquoter"), observers=[observe])
        config = AgentServerConfig(audit_dir=tmp_path / "sdk-audit", observers=(observe,))
        async with sidecar, AgentServer(Quoter(), await mesh_env.settings_for("quoter"), config) as sdk:
            tester = await mesh_env.settings_for("tester", "client")
            async with MeshClient.connect(name="tester", settings=tester) as mesh:
                for name in ("quote", "p-quote"):
                    assert await mesh.node.registry.wait_for_capability(name, 1, timeout=10)
                yield Rig(mesh, sdk, sidecar, seen)


@pytest.mark.parametrize("prefix", ["", "p-"], ids=["sdk", "sidecar"])
async def test_a_2020_12_input_schema_is_enforced_by_its_own_rules(rig: Rig, prefix: str) -> None:
    assert await rig.mesh.call(f"{prefix}quote", {"line": ["sku-1", 2]}, timeout=10) == {"price": 20}
    with pytest.raises(InvalidInputError) as qty:
        await rig.mesh.call(f"{prefix}quote", {"line": ["sku-1", 0]}, timeout=10)
    assert qty.value.field_violations == {"input.line[1]": "0 is less than the minimum of 1"}
    with pytest.raises(InvalidInputError) as sku:
        await rig.mesh.call(f"{prefix}quote", {"line": [7, 1]}, timeout=10)
    assert list(sku.value.field_violations) == ["input.line[0]"]
    assert "input.line[0]" in sku.value.message


def _audited(spool_lines: Any) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in spool_lines]
    return [r.get("record", r) for r in records]


@pytest.mark.parametrize("prefix", ["", "p-"], ids=["sdk", "sidecar"])
async def test_an_answer_breaking_its_output_schema_never_reaches_the_caller(rig: Rig, prefix: str) -> None:
    cap = f"{prefix}quote"
    with pytest.raises(AgentError) as bad:
        await rig.mesh.call(cap, {"line": ["sku-1", 1], "bad": True}, timeout=10)
    err = bad.value
    assert (err.code, err.reason) == (grpc.StatusCode.INTERNAL, "INVALID_OUTPUT")
    assert err.field_violations == {"output.price": '"free" is not of type "number"'}
    assert err.metadata == {"capability": cap, "field": "output.price"} and "output.price" in err.message
    assert "free" not in json.dumps(err.metadata)  # the answer itself is not passed on
    # A stream stops at the first item that breaks the item schema; the ones before it were valid.
    got: list[Any] = []
    with pytest.raises(AgentError) as item:
        async for chunk in rig.mesh.stream(f"{prefix}quote-items", {"line": ["s", 1], "bad": True}, timeout=10):
            got.append(chunk)
    assert item.value.reason == "INVALID_OUTPUT" and item.value.field_violations == {
        "output": '"three" is not of type "integer"'}
    assert got == [1, 2]
    assert [c async for c in rig.mesh.stream(f"{prefix}quote-items", {"line": ["s", 1]}, timeout=10)] == [1, 2, 3]
    # Called unary, a streaming capability answers the list of its items: each is checked.
    assert await rig.mesh.call(f"{prefix}quote-items", {"line": ["s", 1]}, timeout=10) == [1, 2, 3]
    with pytest.raises(AgentError) as listed:
        await rig.mesh.call(f"{prefix}quote-items", {"line": ["s", 1], "bad": True}, timeout=10)
    assert listed.value.field_violations == {"output[2]": '"three" is not of type "integer"'}
    # Observed and audited as a refusal with that reason, by the packaging that refused it.
    assert (cap, "INVALID_OUTPUT") in rig.seen and (f"{prefix}quote-items", "INVALID_OUTPUT") in rig.seen
    audit = rig.sdk.audit if not prefix else rig.sidecar.audit
    assert audit is not None
    refused = [r for r in _audited(audit.spool.lines()) if r.get("reason") == "INVALID_OUTPUT"]
    assert {r["capability"] for r in refused} == {cap, f"{prefix}quote-items"}
    assert all(r["status"] == "INTERNAL" and "output" in r["message"] for r in refused)


async def test_a_card_with_an_unknown_schema_dialect_is_refused_before_joining(mesh_env: MeshEnv) -> None:
    async with PlainQuoter(output_schema={"$schema": "https://example.com/dialects/mine", "type": "object"}) as p:
        sidecar = Sidecar(SidecarConfig(agent=f"127.0.0.1:{p.port}", audit=False),
                          await mesh_env.settings_for("pquoter"))
        with pytest.raises(SchemaError, match=r"capability p-quote output: unsupported \$schema"):
            await sidecar.start()
        assert sidecar.node is None  # refused before it joined or registered anything
