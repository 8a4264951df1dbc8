"""`hivemesh allow` against a real control plane, etcd and mesh: with neither a grant nor an authz rule a client
cannot call; one `allow` (caller given as `client/alice`) writes both documents in one transaction, the call then
goes through, and `authz check` names the grant and the rule. The CLI runs as a child process with stdout a
pipe, and its lines wider than 80 columns come out whole. (Both gates closed, explained: tests/unit.)"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, run_cli, start_mesh_env, stop_mesh_env

TD = f"spiffe://{TRUST_DOMAIN}"
ECHO = f"{TD}/agent/echo"
ALICE = f"{TD}/client/alice"
def took(since: float) -> float:
    return time.monotonic() - since


OPERATORS_ONLY = {"grants": [{"name": "operators", "subjects": [f"{TD}/operator/*"], "capabilities": ["*"]}]}


async def test_allow_opens_both_gates_at_once_and_authz_check_explains_each(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # the CLI's stdout is a pipe and nothing says how wide
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, OPERATORS_ONLY, authz=None)
    try:
        async with AgentServer(EchoAgent(), await env.settings_for("echo"),
                               AgentServerConfig(audit_dir=tmp_path / "audit")), \
                MeshClient.connect(name="alice", settings=await env.settings_for("alice", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            with pytest.raises(HivemeshError):
                await mesh.call("echo", {"text": "hi"}, timeout=5)

            code, out, err = await run_cli(env, "allow", "client/alice", "echo", "--json")
            assert code == 0, err
            done = json.loads(out)
            assert done["caller"] == ALICE and done["name"] == "allow-client-alice-echo"
            assert sorted((a["kind"], a["action"]) for a in done["applied"]) == [("authz", "created"),
                                                                                 ("grants", "created")]
            assert {a["version"] for a in done["applied"]} == {done["revision"]}  # one transaction, one revision

            done_at = time.monotonic()
            deadline = done_at + 10
            while True:  # the nodes learn the rule, the control plane the grant, within about a second
                try:
                    reply = await mesh.call("echo", {"text": "hi"}, timeout=5)
                    break
                except HivemeshError:
                    assert time.monotonic() < deadline, "the call was still refused 10 s after `hivemesh allow`"
                    await asyncio.sleep(0.1)
            assert reply
            print(f"\nFIGURE access: the call went through {took(done_at):.2f} s after `hivemesh allow` returned")

            code, out, err = await run_cli(env, "authz", "check", "--caller", "client/alice", "--capability", "echo")
            assert code == 0, out + err
            lines = out.splitlines()
            assert lines[0] == f"ALLOW on {ECHO}"
            assert lines[1].split() == ["1.", "token", "(grants):", "ALLOW", "grant", "allow-client-alice-echo",
                                        "lets", ALICE, "get", "tokens", "for", "echo"]
            assert lines[2].startswith("  2. call (authz):   ALLOW  allow-client-alice-echo/allow allows"), lines
            assert lines[2].endswith(f"invoke echo on {ECHO}"), lines  # one line, though wider than 80 columns
    finally:
        await stop_mesh_env(env)
