"""Waiting for a node's published traffic status in-process (the RPC behind `hivemesh status`), so a test
spends one CLI process on the output it checks rather than one per poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from hivemesh.v1 import policy_pb2, policy_pb2_grpc
from tests.support.meshenv import MeshEnv


async def traffic_status(env: MeshEnv) -> list[policy_pb2.NodeTraffic]:
    """Every node's last published status, as the operator reads it."""
    stub = policy_pb2_grpc.PoliciesStub(env.operator.channel)
    resp = await stub.GetTrafficStatus(policy_pb2.GetTrafficStatusRequest(), timeout=10)
    return list(resp.nodes)


async def wait_traffic_status(
    env: MeshEnv, done: Callable[[list[policy_pb2.NodeTraffic]], bool], timeout: float = 60.0
) -> bool:
    """Poll until done(status) holds (True) or timeout passed (False); nodes publish every ~2 s."""
    deadline = time.monotonic() + timeout
    while not done(await traffic_status(env)):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True
