"""A new user's review of `hivemesh call` and `hivemesh audit`, on the real mesh with the real CLI: a call without
--timeout takes the capability's `timeouts` policy (as an SDK call without one does), a call without --data sends
`{}`, an audit query for --capability X does not find the control plane's records of earlier queries for X,
identity filters take KIND/NAME, and `audit tail -f` prints its header once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, TypedDict

from hivemesh.sdk import Agent, AgentServer, MeshClient, capability
from hivemesh.v1 import audit_pb2
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, apply_policies_text, run_cli

HOLD_S = 5.0
"""How long the holding agent keeps a call: far past the 300 ms policy default, well short of the CLI's old 30 s."""


class Optional(TypedDict, total=False):
    text: str


class HoldAgent(Agent):
    """Holds each call (unary or streamed) until released or HOLD_S passed, then answers; `seen` answers with
    the input it was given."""

    name = "hold"
    version = "1.0.0"

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def _held(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), HOLD_S)

    @capability(description="Answer once released (or after HOLD_S)")
    async def hold(self, req: Optional) -> dict[str, str]:
        await self._held()
        return {"answer": "late"}

    @capability(description="Stream one item once released (or after HOLD_S)", name="hold-stream")
    async def hold_stream(self, req: Optional) -> AsyncIterator[str]:
        await self._held()
        yield "late"

    @capability(description="Answer with the input, whatever fields it has (all optional)")
    async def seen(self, req: Optional) -> dict[str, Any]:
        return {"got": dict(req)}


async def test_call_without_timeout_takes_the_timeouts_policy_default(mesh_env: MeshEnv) -> None:
    agent = HoldAgent()
    async with AgentServer(agent, await mesh_env.settings_for("hold")):
        await apply_policies_text(mesh_env.etcd, "kind: timeouts\nname: hold-fast\n"
                                                 "spec: {capabilities: [hold, hold-stream], default_ms: 300}\n")
        try:
            for args in (("hold",), ("hold-stream", "--stream")):
                t0 = time.monotonic()
                code, out, err = await run_cli(mesh_env, "call", *args, "--data", "{}")
                assert code == 1 and "deadline" in err.lower() and "late" not in out, (args, code, out, err)
                # Well short of HOLD_S: the policy's 300 ms, not a deadline of the CLI's own, ended it.
                assert time.monotonic() - t0 < HOLD_S, args
            # --timeout still wins over the policy.
            agent.release.set()
            code, out, err = await run_cli(mesh_env, "call", "hold", "--json", "--timeout", "20")
            assert code == 0 and json.loads(out) == {"answer": "late"}, (out, err)
        finally:
            agent.release.set()


async def test_call_without_data_sends_an_empty_object(mesh_env: MeshEnv) -> None:
    async with AgentServer(HoldAgent(), await mesh_env.settings_for("hold")):
        code, out, err = await run_cli(mesh_env, "call", "seen", "--json")
        assert code == 0 and json.loads(out) == {"got": {}}, (code, out, err)
        code, out, err = await run_cli(mesh_env, "call", "seen", "--json", "--data", '{"text": "x"}')
        assert code == 0 and json.loads(out) == {"got": {"text": "x"}}, (code, out, err)
        # JSON null is still there for a capability that takes it: asked for by name.
        code, out, err = await run_cli(mesh_env, "call", "seen", "--data", "null")
        assert code == 1 and "null" in err and "Traceback" not in err, (code, out, err)


async def _own_queries(env: MeshEnv) -> list[dict[str, Any]]:
    resp = await env.operator.call(env.operator.audit.Query,
                                   audit_pb2.AuditQueryRequest(kind="controlplane", limit=10000))
    return [r for e in resp.entries if (r := json.loads(e)["record"]).get("method") == "Audit/Query"]


async def test_a_query_does_not_find_the_records_of_earlier_queries(mesh_env: MeshEnv) -> None:
    """A filter named like a record field is recorded as request_<name>: the second of two equal queries must not
    find the first (`audit tail -f --capability X` found its own polls, one a second)."""
    for name, value in (("capability", "shout"), ("jti", "jti-1")):
        for _ in range(2):
            code, out, err = await run_cli(mesh_env, "audit", "query", f"--{name}", value, "--json")
            assert code == 0 and out == "", (name, out, err)
        # Both queries are on record, their filter kept apart.
        recorded = [r for r in await _own_queries(mesh_env) if r.get(f"request_{name}") == value]
        assert len(recorded) == 2 and all(name not in r for r in recorded), recorded


async def test_a_revocation_stays_findable_by_the_jti_it_names(mesh_env: MeshEnv) -> None:
    """Outside audit reads, a request's jti is what the record is about: `audit query --jti J` lists J's
    revocation (who revoked it, when), while queries for J stay apart (above)."""
    code, out, err = await run_cli(mesh_env, "tokens", "revoke", "--jti", "jti-revoked-1", "--note", "leaked")
    assert code == 0, err
    code, out, err = await run_cli(mesh_env, "audit", "query", "--jti", "jti-revoked-1", "--json")
    assert code == 0, err
    records = [json.loads(line)["record"] for line in out.splitlines()]
    revocations = [r for r in records if r.get("method", "").endswith("/Revoke")]
    assert len(revocations) == 1 and revocations[0]["jti"] == "jti-revoked-1", records


async def test_identity_filters_take_kind_slash_name(mesh_env: MeshEnv) -> None:
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo")):
        async with MeshClient.connect(name="reporter",
                                      settings=await mesh_env.settings_for("reporter", "client")) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            await mesh.call("echo", {"text": "hi"}, timeout=10)
    reporter = f"spiffe://{TRUST_DOMAIN}/client/reporter"
    for given in ("client/reporter", f"{TRUST_DOMAIN}/client/reporter", reporter, "*reporter", "client/rep*"):
        code, out, err = await run_cli(mesh_env, "audit", "query", "--caller", given, "--json")
        callers = {json.loads(line)["record"]["caller"] for line in out.splitlines()}
        assert code == 0 and callers == {reporter}, (given, out, err)
    # A bare name matches no SPIFFE id: said so, not "no matching audit records".
    code, out, err = await run_cli(mesh_env, "audit", "query", "--caller", "reporter")
    assert code == 2 and "--caller" in err and "KIND/NAME" in err and "Traceback" not in err, (out, err)
    code, out, err = await run_cli(mesh_env, "audit", "tail", "--principal", "robot/x")
    assert code == 2 and "--principal" in err, (out, err)
    code, out, err = await run_cli(mesh_env, "audit", "query", "--agent", "other.domain/agent/echo")
    assert code == 2 and "--agent" in err and "not a SPIFFE id" in err, (out, err)


async def test_tail_follow_prints_the_header_once(mesh_env: MeshEnv) -> None:
    """Each poll of `tail -f --kind controlplane` is itself recorded, so every poll after the first has a new row
    (the previous poll's record): three rows, at least two batches, and one header above them."""
    s = mesh_env.base_settings()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    env.update(HIVEMESH_ETCD=s.etcd, HIVEMESH_CONTROLPLANE=s.controlplane, HIVEMESH_JOIN=s.join,
               HIVEMESH_CA=str(s.ca_bundle), HIVEMESH_TRUST_DOMAIN=s.trust_domain,
               HIVEMESH_HOME=str(mesh_env.certs.certs_dir.parent / "cli-home"), PYTHONUNBUFFERED="1",
               COLUMNS="250")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hivemesh.controlplane.cli", "--certs-dir", str(mesh_env.certs.certs_dir),
        "audit", "tail", "-n", "1", "-f", "--kind", "controlplane",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while sum("Audit/Query" in line for line in lines) < 3:
            left = deadline - time.monotonic()
            assert left > 0, f"fewer than 3 rows within 30 s: {lines}"
            line = await asyncio.wait_for(proc.stdout.readline(), left)
            assert line, f"tail -f ended: {lines} {(await proc.stderr.read()).decode()}"
            lines.append(line.decode())
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    headers = [line for line in lines if line.split()[:1] == ["seq"] and "decision" in line]
    assert len(headers) == 1 and lines.index(headers[0]) < min(
        i for i, line in enumerate(lines) if "Audit/Query" in line), lines
