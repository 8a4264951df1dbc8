"""`python -m hivemesh.agents.run` binds what the environment says ($HIVEMESH_LISTEN), as every SDK agent does:
`hivemesh up --listen 0.0.0.0` sets it for its agents, and a fixed `--host 127.0.0.1` default left them reachable
from this host only while the registry advertised them to every other."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import pytest

from tests.support.meshenv import MeshEnv
from tests.support.spawn import REPO, child_env, stop

pytestmark = pytest.mark.timeout(90)

READY_S = 45.0


def _listeners(port: int) -> set[str]:
    """What the sockets listening on port are bound to: "any" (every interface: 0.0.0.0, or gRPC's dual-stack
    `::`) or "loopback" (127.0.0.1, as an IPv4 socket or IPv4-mapped on a dual-stack one), else the raw hex."""
    named = {"00000000": "any", "0" * 32: "any", "0100007F": "loopback", "0000000000000000FFFF00000100007F": "loopback"}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            host, _, hex_port = fields[1].rpartition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(named.get(host, host))
    return found


@pytest.mark.parametrize(("given", "bound"), [({"HIVEMESH_LISTEN": "0.0.0.0", "HIVEMESH_ADVERTISE": "127.0.0.1"},
                                              "any"), ({}, "loopback")])
async def test_a_reference_agent_binds_the_listen_host_of_its_environment(
    mesh_env: MeshEnv, tmp_path: Path, given: dict[str, str], bound: str,
) -> None:
    env = await child_env(mesh_env, "ocr", tmp_path / "ocr-home", HIVEMESH_METRICS_LISTEN="off", **given)
    log = tmp_path / "ocr.log"
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "hivemesh.agents.run", "ocr", cwd=REPO,
                                                    env=env, stdout=out, stderr=asyncio.subprocess.STDOUT,
                                                    start_new_session=True)
    try:
        deadline = time.monotonic() + READY_S
        while not (m := re.search(r"agent ocr serving on 127\.0\.0\.1:(\d+) ", log.read_text(errors="replace"))):
            assert proc.returncode is None, f"the agent exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the agent did not serve within {READY_S} s:\n{log.read_text()}"
            await asyncio.sleep(0.1)
        # Advertised on 127.0.0.1 either way; bound on every interface only when the environment says so.
        assert _listeners(int(m.group(1))) == {bound}, (given, _listeners(int(m.group(1))))
    finally:
        await stop(proc)
