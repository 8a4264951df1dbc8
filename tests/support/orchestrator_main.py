"""An orchestrator as its own process, to be killed mid-workflow: `python -m tests.support.orchestrator_main MODE ...`.

    start WORKFLOW_ID ACCOUNT   submit tests.support.orch_workflows:charge_flow under that id and drive it
    resume-all                  resume every unfinished run this orchestrator owns (automatic resume on restart)

The mesh location and a one-time HIVEMESH_JOIN_TOKEN for client "orchestrator" come from HIVEMESH_*; the
run-ownership lease TTL from HIVEMESH_LOCK_TTL_S (default 2). Prints "driving <id>" once the run is owned and
"done <id> <state>" at the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from hivemesh.sdk import MeshClient, MeshSettings
from hivemesh.sdk.workflow import WorkflowEngine


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _main(argv: list[str]) -> int:
    ttl = int(os.environ.get("HIVEMESH_LOCK_TTL_S", "2"))
    async with MeshClient.connect(name="orchestrator", settings=MeshSettings.resolve()) as mesh:
        for cap in ("upper", "charge"):
            await mesh.node.registry.wait_for_capability(cap, 1, timeout=10)
        async with WorkflowEngine(mesh, owner="orchestrator", lock_ttl_s=ttl) as engine:
            if argv[0] == "start":
                handle = await engine.submit("tests.support.orch_workflows:charge_flow",
                                             {"account": argv[2], "delay": float(argv[3]) if len(argv) > 3 else 0.0},
                                             workflow_id=argv[1])
                handles = [handle]
            else:
                handles = await engine.resume_all(wait_s=ttl + 3.0)
            for h in handles:
                _say(f"driving {h.id}")
            for h in handles:
                state = await h.result()
                _say(f"done {h.id} {state.state}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(asyncio.run(_main(sys.argv[1:])))
