"""Registry entries are bound to identities (issue 10, TEST_MATRIX H2): a workload with a valid certificate
for one identity writes an entry under another agent's name; callers never dial it and never hand it a token.

The impostor is a real SDK agent with a real certificate (as `mallory`) behind a TCP counter, so "0 calls and
0 tokens" is measured where it would happen: no connection is ever opened to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aetcd

from hivemesh.mesh.registry import AGENTS_PREFIX, ImpostorEntryError, decode_instance, expected_identity
from hivemesh.sdk import Agent, AgentServer, Context, MeshClient, capability
from hivemesh.v1.mesh_pb2 import AgentInstance
from tests.support.agents_for_tests import Echo, EchoAgent, Text
from tests.support.meshenv import ALLOW_ALL_AUTHZ, TRUST_DOMAIN, MeshEnv, apply_policies_text, run_cli
from tests.support.orch_env import wait_until


class Mallory(Agent):
    """Registers honestly as `mallory` (capability `steal`) and answers `echo` if ever asked; counts calls."""

    name = "mallory"
    version = "1.0.0"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @capability(description="what mallory really offers", idempotent=True)
    async def steal(self, req: Text, ctx: Context) -> Echo:
        self.calls += 1
        return {"text": "impostor", "caller": ctx.caller, "served_by": "impostor"}


class ConnectionCounter:
    """A loopback TCP forwarder that counts the connections opened through it."""

    def __init__(self, target: str) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> ConnectionCounter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_r, up_w = await asyncio.open_connection(self.host, self.port)

            async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await r.read(65536):
                        w.write(data)
                        await w.drain()
                w.close()

            await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
        finally:
            self._tasks.discard(task)


@contextlib.asynccontextmanager
async def _served(env: MeshEnv, agent: Agent) -> AsyncIterator[AgentServer]:
    async with AgentServer(agent, await env.settings_for(agent.name)) as server:
        yield server


async def test_an_impostor_entry_gets_no_calls_and_no_tokens(mesh_env: MeshEnv, etcd: aetcd.Client) -> None:
    await apply_policies_text(mesh_env.etcd, ALLOW_ALL_AUTHZ)
    real, mallory = EchoAgent("real"), Mallory()
    async with _served(mesh_env, real), _served(mesh_env, mallory) as evil, ConnectionCounter(evil.endpoint) as wire:
        settings = await mesh_env.settings_for("caller", "client")
        async with MeshClient.connect(name="caller", settings=settings) as client:
            assert await client.node.registry.wait_for_capability("echo", 1, timeout=10)
            refused_before = client.node.registry.impostors_refused
            # One etcd write: an entry under `echo`, carrying mallory's own (real) identity and endpoint.
            fake = AgentInstance(instance_id="fake-1", endpoint=wire.endpoint, identity=evil.node.workload.spiffe_id,
                                 packaging="in-process")
            fake.card.CopyFrom(real.card())
            await etcd.put(f"{AGENTS_PREFIX}echo/fake-1".encode(), fake.SerializeToString())
            await wait_until(lambda: client.node.registry.impostors_refused > refused_before, 10,
                             "the node to see (and refuse) the impostor entry")
            answers = [await client.call("echo", {"text": f"t{i}"}, timeout=10) for i in range(6)]
            assert all(a["served_by"] == "real" for a in answers), answers
            assert "fake-1" not in {i.instance_id for i in client.node.registry.instances("echo")}
        # The operator's `hivemesh call` (a fresh node that reads the impostor entry at start): before, the entry
        # made every such call fail (GRANT_DENIED); now it reaches the real instance.
        code, out, err = await run_cli(mesh_env, "call", "echo", "--json", "--data", '{"text": "operator"}')
        assert code == 0, err
        assert json.loads(out)["served_by"] == "real"
    print(f"\nimpostor: connections {wire.connections}, calls {mallory.calls}, real calls {real.calls}")
    assert wire.connections == 0 and mallory.calls == 0
    assert real.calls == 7


def test_decode_binds_the_entry_to_its_key() -> None:
    inst = AgentInstance(instance_id="i1", endpoint="127.0.0.1:1", identity=expected_identity(TRUST_DOMAIN, "echo"))
    inst.card.name = "echo"
    inst.card.capabilities.add(name="echo")
    key = f"{AGENTS_PREFIX}echo/i1".encode()
    assert decode_instance(key, inst.SerializeToString(), TRUST_DOMAIN).identity == inst.identity
    for wrong in ("spiffe://hivemesh.local/agent/mallory", "spiffe://other.domain/agent/echo",
                  "spiffe://hivemesh.local/client/echo", ""):
        inst.identity = wrong
        try:
            decode_instance(key, inst.SerializeToString(), TRUST_DOMAIN)
        except ImpostorEntryError as exc:
            assert "only 'spiffe://hivemesh.local/agent/echo' may serve" in str(exc)
        else:
            raise AssertionError(f"identity {wrong!r} was accepted for agent echo")
