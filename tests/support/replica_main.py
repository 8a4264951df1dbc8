"""One EchoAgent replica as its own process, for the registry fault tests: `python -m tests.support.replica_main`.

Where the mesh is comes from the HIVEMESH_* variables (`MeshSettings.resolve`), including a one-time
HIVEMESH_JOIN_TOKEN; HIVEMESH_REPLICA_TAG names the replica (echoed back as `served_by`) and
HIVEMESH_LEASE_TTL_S sets its registration lease. Prints `ready <endpoint> <instance-id>` once it is
registered, then serves until SIGTERM/SIGINT (or dies to SIGKILL, which is the point).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from hivemesh.sdk import AgentServerConfig, MeshSettings, serve
from tests.support.agents_for_tests import EchoAgent


async def _main() -> None:
    tag = os.environ.get("HIVEMESH_REPLICA_TAG", "replica")
    ttl = int(os.environ.get("HIVEMESH_LEASE_TTL_S", "3"))
    server = await serve(EchoAgent(tag), MeshSettings.resolve(), AgentServerConfig(lease_ttl_s=ttl, instance_id=tag))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(f"ready {server.endpoint} {server.instance_id}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await server.stop(0.5)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(_main())
