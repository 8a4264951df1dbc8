"""What the resilience integration tests share: agents that fail on purpose (on command: an error code, a
delay, a crash of the process), a few replicas of them on the real mesh, and policy helpers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import aetcd
import grpc

from hivemesh.controlplane import policies as store
from hivemesh.mesh.errors import (
    AgentError,
    AgentUnavailableError,
    FailedPreconditionError,
    HivemeshError,
    InvalidInputError,
    OverloadedError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from hivemesh.mesh.node import MeshNode
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, Context, MeshClient, capability
from tests.support.meshenv import MeshEnv

FAILURES: dict[str, Callable[[str], HivemeshError]] = {
    "UNAVAILABLE": AgentUnavailableError,
    "INTERNAL": AgentError,
    "INVALID_ARGUMENT": InvalidInputError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "RESOURCE_EXHAUSTED": OverloadedError,
}


class Work(TypedDict, total=False):
    text: str
    code: str
    seconds: float


class FlakyAgent(Agent):
    """Fails on command. `mode` is "ok" or a status code name that every `work` call fails with."""

    name = "flaky"
    version = "1.0.0"

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag
        self.mode = "ok"
        self.delay = 0.0
        self.first_call_delay: float | None = None
        self.calls: Counter[str] = Counter()
        self.effects: Counter[str] = Counter()
        self.started: Counter[str] = Counter()

    def _fail(self) -> None:
        if self.mode != "ok":
            raise FAILURES[self.mode](f"{self.tag} fails on purpose with {self.mode}")

    @capability(idempotent=True)
    async def work(self, req: Work) -> dict[str, str]:
        """Answer with the replica's tag, or fail as told."""
        self.calls["work"] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        self._fail()
        return {"served_by": self.tag}

    @capability(idempotent=True, name="fail-with")
    async def fail_with(self, req: Work) -> dict[str, str]:
        """Fail with the status code named in the input (every attempt is counted per code)."""
        self.calls[req.get("code", "")] += 1
        raise FAILURES[req["code"]](f"failing with {req['code']} on purpose")

    @capability
    async def charge(self, req: Work, ctx: Context) -> dict[str, Any]:
        """A non-idempotent effect: counted once per idempotency key, as the last thing the handler does."""
        key = ctx.idempotency_key or f"(no key {self.calls['charge']})"
        self.calls["charge"] += 1
        self.started[key] += 1
        delay = self.first_call_delay if self.started[key] == 1 and self.first_call_delay else self.delay
        if delay:
            await asyncio.sleep(delay)
        self._fail()
        self.effects[key] += 1
        return {"served_by": self.tag, "effects": self.effects[key]}


class FlakyV2(FlakyAgent):
    version = "2.0.0"


class BackupAgent(Agent):
    """A lesser capability to fall back to."""

    name = "backup"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @capability(idempotent=True, name="work-lite")
    async def work_lite(self, req: Work) -> dict[str, str]:
        """A cheaper answer."""
        self.calls += 1
        return {"served_by": "backup"}


@dataclass
class Fleet:
    """Replicas of FlakyAgent serving on the mesh, plus one client."""

    agents: list[FlakyAgent]
    servers: list[AgentServer]
    client: MeshClient

    def by_instance(self) -> dict[str, FlakyAgent]:
        return {s.instance_id: a for s, a in zip(self.servers, self.agents, strict=True)}

    def nodes(self) -> list[MeshNode]:
        return [self.client.node, *(s.node for s in self.servers)]


@contextlib.asynccontextmanager
async def fleet(
    env: MeshEnv, tags: Sequence[str] = ("a", "b", "c"), *, agent_types: Sequence[type[FlakyAgent]] | None = None,
    client_name: str = "tester",
) -> AsyncIterator[Fleet]:
    types = list(agent_types or [FlakyAgent] * len(tags))
    agents = [t(tag) for t, tag in zip(types, tags, strict=True)]
    servers = [AgentServer(a, await env.settings_for("flaky"),
                           AgentServerConfig(instance_id=f"flaky-{a.tag}")) for a in agents]
    async with contextlib.AsyncExitStack() as stack:
        await asyncio.gather(*(stack.enter_async_context(s) for s in servers))
        client = await stack.enter_async_context(
            MeshClient.connect(name=client_name, settings=await env.settings_for(client_name, "client"))
        )
        assert await client.node.registry.wait_for_capability("work", len(servers), timeout=10)
        yield Fleet(agents, servers, client)


async def apply(etcd: aetcd.Client, text: str, nodes: Sequence[MeshNode] = (), timeout: float = 5.0) -> int:
    """Apply policy text through the store (validated, one transaction); wait until every node has it."""
    result = await store.apply_text(etcd, text)
    revision = result.revision or max(a.version for a in result.applied)
    for node in nodes:
        assert await node.policies.wait_for_revision(revision, timeout), f"{node.name} did not get revision {revision}"
    return revision


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.01) -> float:
    """Poll predicate() until true; returns the monotonic time it became true; fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(step)
    return time.monotonic()


def status_code(err: BaseException) -> grpc.StatusCode | None:
    return err.code if isinstance(err, HivemeshError) else None


# --- a three-hop chain, for deadlines and cancellation ---------------------------------------------------------------
class Hops:
    """When each hop of a chain started and stopped (finished, failed or cancelled), by hop name."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.stopped: dict[str, float] = {}
        self.how: dict[str, str] = {}

    def reset(self) -> None:
        self.started.clear()
        self.stopped.clear()
        self.how.clear()


class _Hop(Agent):
    next_capability = ""

    def __init__(self, hops: Hops) -> None:
        super().__init__()
        self.hops = hops

    async def _serve(self, hop: str, ctx: Context, seconds: float) -> dict[str, str]:
        self.hops.started[hop] = time.monotonic()
        how = "finished"
        try:
            if self.next_capability:
                await ctx.call_capability(self.next_capability, {"seconds": seconds})
            else:
                await asyncio.sleep(seconds)
            return {"hop": hop}
        except asyncio.CancelledError:
            how = "cancelled"
            raise
        except HivemeshError as err:
            how = err.reason
            raise
        finally:
            self.hops.stopped[hop] = time.monotonic()
            self.hops.how[hop] = how


class HopA(_Hop):
    name = "hop-a"
    next_capability = "hop-b"

    @capability(name="hop-a")
    async def run(self, req: Work, ctx: Context) -> dict[str, str]:
        """First hop: calls hop-b."""
        return await self._serve("a", ctx, req.get("seconds", 5.0))


class HopB(_Hop):
    name = "hop-b"
    next_capability = "hop-c"

    @capability(name="hop-b")
    async def run(self, req: Work, ctx: Context) -> dict[str, str]:
        """Second hop: calls hop-c."""
        return await self._serve("b", ctx, req.get("seconds", 5.0))


class HopC(_Hop):
    name = "hop-c"

    @capability(name="hop-c")
    async def run(self, req: Work, ctx: Context) -> dict[str, str]:
        """Last hop: works for a while."""
        return await self._serve("c", ctx, req.get("seconds", 5.0))


CHAIN_GRANT = """
kind: grants
name: chain
spec:
  subjects: ["spiffe://hivemesh.local/agent/*"]
  capabilities: ["hop-*"]
"""
