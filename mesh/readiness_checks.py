"""The pulled readiness checks (`Readiness.watch`): each asks one part of a node whether it can still work.

Each returns what is wrong, or None. They are bounded by a timeout, so a hung dependency is reported as one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from hivemesh.mesh.readiness import Check
from hivemesh.mesh.registry import Registration, RegistryView
from hivemesh.v1 import agent_pb2, agent_pb2_grpc


def agent_answers(channel: grpc.aio.Channel, address: str, timeout_s: float) -> Check:
    """The agent behind a sidecar answers `Describe` on its plaintext link within timeout_s."""
    stub = agent_pb2_grpc.AgentStub(channel)

    async def check() -> str | None:
        try:
            await stub.Describe(agent_pb2.DescribeRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return f"the agent at {address} does not answer Describe: {exc.code().name} {exc.details() or ''}"
        return None

    return check


def registration_held(registration: Registration, registry: RegistryView, wait_s: float) -> Check:
    """The node's own registry entry exists: its lease is live, and its key is in the node's registry view.

    A lost lease is re-granted by the registration itself. A key deleted under a live lease (by hand, or a
    restore of an older etcd snapshot) would stay gone, so it is written again here under the same lease; the
    node says NOT_SERVING until its view shows the entry back."""

    async def check() -> str | None:
        key = registration.key
        if not registration.registered:
            return f"the registry lease of {key} is lost; registering again (last error: {registration.last_error!r})"
        if await registry.cache.wait_for(lambda snap: key in snap, wait_s):
            return None
        async with asyncio.timeout(max(2.0, 2 * wait_s)):  # etcd may be what is failing: stay bounded
            await registration.update(registration.instance)  # the same document, under the live lease
        return f"the registry entry {key} is gone; written again under its lease"

    return check


def etcd_answers(etcd: Any, endpoints: str, key: bytes, timeout_s: float) -> Check:
    """etcd answers a linearizable read of key within timeout_s (so a member cut off from quorum does not)."""

    async def check() -> str | None:
        try:
            async with asyncio.timeout(timeout_s):
                await etcd.get(key)
        except Exception as exc:  # noqa: BLE001 - any failure to read means etcd cannot be relied on
            return f"etcd at {endpoints} does not answer: {exc!r}"
        return None

    return check
