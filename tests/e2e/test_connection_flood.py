"""A burst of connections that never finish a TLS handshake must not take an agent down.

grpcio 1.85's asyncio server corrupted its heap when the certificate fetcher handed it a new configuration at
every handshake: a few thousand connect-and-hang-up connections crashed a real SDK agent (SIGABRT, SIGSEGV or
SIGFPE). The fetcher now answers "no change" unless the certificate changed (`renewing_server_credentials`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from hivemesh.mesh.audit.handshake.switch import child_environment
from hivemesh.sdk import MeshClient
from tests.support.meshenv import MeshEnv
from tests.support.spawn import start_replica, stop
from tests.support.tls_attacks import raw_attempt

FLOOD = 15_000
"""Connections: the old code crashed after about 7,000 to 14,000 of them on this machine."""


def _flood(port: int, count: int, seconds: float) -> int:
    done = 0
    deadline = time.monotonic() + seconds
    while done < count and time.monotonic() < deadline:
        raw_attempt(port, b"")
        done += 1
    return done


@pytest.mark.slow
async def test_an_agent_survives_a_flood_of_unfinished_handshakes(mesh_env: MeshEnv, tmp_path: Path) -> None:
    # As `hivemesh up` starts agents: with gRPC's handshaker tracer, so the stderr tee takes the flood too.
    proc, endpoint = await start_replica(mesh_env, "echo-1", tmp_path / "home", tmp_path / "agent.log",
                                         **child_environment({}, inherit={}))
    try:
        port = int(endpoint.rpartition(":")[2])
        done = await asyncio.to_thread(_flood, port, FLOOD, 60)
        assert proc.returncode is None, f"the agent died after {done} connections ({proc.returncode})"
        async with MeshClient.connect(name="after", settings=await mesh_env.settings_for("after", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=15)
            result = await mesh.call("echo", {"text": "still here"}, timeout=15)
        assert result["text"] == "still here"
        assert proc.returncode is None
        print(f"\nFIGURE connection flood: {done} unfinished handshakes, the agent still answers")
    finally:
        await stop(proc)
