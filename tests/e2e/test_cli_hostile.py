"""What workloads write reaches the operator's terminal through `hivemesh` (the real CLI in a child process, a
real control plane and etcd), and none of it may steer that terminal or take a command down: an audit record of a
refused call, an escalation's reason, a workflow-index entry, a policy's description, a file's name and an
external A2A agent's card are written with their control characters shown, never raw; hostile index entries are
listed as malformed; an agent card's version must be printable; `-f /dev/zero` is refused at the limit."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import grpc
import pytest

from hivemesh.controlplane.cli.policy_client import PolicyClient
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.etcd import client as etcd_client
from hivemesh.mesh.keyspace import WORKFLOW_INDEX
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.sdk.escalation import EscalationClient
from hivemesh.v1 import agent_pb2, audit_pb2
from tests.support.a2a_rig import ToolsExecutor, serve_a2a, tools_card
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import MeshEnv, run_cli
from tests.support.rlimits import limited
from tests.support.spawn import REPO, _first_line, _spawn, _tail, child_env, stop

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _wide_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's tables fold cells to COLUMNS (the suite's xdist workers run with 80): these tests read whole
    values out of the table rows, so the child CLI gets a terminal wide enough for any of them."""
    monkeypatch.setenv("COLUMNS", "400")

ESC = "x\x1b[2K\x1b[1A\x1b[2K\x1b[8m\x1b]0;pwned\x1b\\\x9b2J\x7f\u202eevil\u2066"
"""Erase this line and the row above, conceal the rest, set the window title; a C1 CSI, DEL, a right-to-left
override and an isolate."""
SHOWN = "x\\x1b[2K\\x1b[1A"
"""How the start of ESC reads once cleaned."""
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def assert_clean(what: str, written: str) -> None:
    """The bytes the CLI wrote hold no ESC, C1 control (UTF-8 C2 80..C2 9F), DEL or bidi control."""
    raw = written.encode()
    assert b"\x1b" not in raw and not re.search(rb"\xc2[\x80-\x9f]", raw) and not RAW.search(written), (
        f"{what} wrote control characters raw: {written!r}")


async def _refused_call_recorded(mesh_env: MeshEnv, tmp_path: Path) -> None:
    """mallory calls echo with a capability name full of escapes: refused, and recorded in the audit log."""
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                           AgentServerConfig(audit_dir=tmp_path / "spools")) as server:
        async with MeshClient.connect(name="mallory", settings=await mesh_env.settings_for("mallory", "client"),
                                      audit=False) as mesh:
            assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
            inst = mesh.node.registry.instances("echo")[0]
            ep = mesh.node.outbound.channels.get(inst.endpoint, inst.identity, inst.link_endpoint)
            token = await mesh.node.outbound.tokens.get(inst.identity, "echo")
            req = agent_pb2.InvokeRequest(capability=ESC, input=b"{}", content_type="application/json")
            with pytest.raises(grpc.aio.AioRpcError):
                await ep.invoke(req.SerializeToString(), timeout=5, metadata=[("authorization", f"Bearer {token}")])
        assert await server.audit.shipper.wait_shipped(timeout=10)
    got = await mesh_env.operator.audit.Query(audit_pb2.AuditQueryRequest(agent="*/agent/echo"), timeout=10)
    assert any(json.loads(e)["record"].get("capability") == ESC for e in got.entries), got.entries


async def test_hostile_mesh_text_never_reaches_the_terminal(mesh_env: MeshEnv, tmp_path: Path) -> None:
    """Before: `audit tail` wrote the record's escapes raw (the row erased itself), `escalations list/show`
    showed the approver another request, `workflows list` and `policy list` wrote theirs too, and so did
    errors naming a file."""
    await _refused_call_recorded(mesh_env, tmp_path)
    async with MeshClient.connect(name="mallory", settings=await mesh_env.settings_for("mallory", "client"),
                                  audit=False) as mesh:
        await EscalationClient(mesh.node.controlplane).create(f"wire 50000 USD {ESC}", {"amount": 50000},
                                                              escalation_id="esc-evil")
        etcd = etcd_client(mesh.node.etcd)  # mallory's own etcd role: her own runs' index entries
        try:
            await etcd.put(f"{WORKFLOW_INDEX}client-mallory/r1".encode(), json.dumps({
                "id": "client-mallory/r1", "state": f"WORKING{ESC}", "definition": ESC, "owner": ESC,
                "created_at": 1.0, "steps": 1, "tokens": 2}).encode())
        finally:
            await etcd.close()
    await PolicyClient(mesh_env.operator).apply([{"kind": "timeouts", "name": "t", "description": ESC,
                                                  "spec": {"default_ms": 100}}])
    named = tmp_path / f"policies{ESC}.yaml"
    named.write_text("kind: [unclosed\n")

    for args, shown_in in [
        (("audit", "tail", "-n", "5", "--agent", "*/agent/echo"), "out"),
        (("escalations", "list"), "out"),
        (("escalations", "show", "esc-evil"), "out"),
        (("workflows", "list"), "out"),
        (("policy", "list"), "out"),
        (("policy", "apply", "-f", str(named)), "err"),
    ]:
        code, out, err = await run_cli(mesh_env, *args)
        assert "Traceback" not in err, (args, err)
        assert_clean(f"hivemesh {' '.join(args)} (stdout)", out)
        assert_clean(f"hivemesh {' '.join(args)} (stderr)", err)
        assert SHOWN in (out if shown_in == "out" else err), (args, code, out, err)  # shown, not dropped


async def test_workflows_list_shows_hostile_index_entries_as_malformed(mesh_env: MeshEnv) -> None:
    """Every workload writes its own runs' index entries. Before, one of them took `workflows list` down for the
    operator: KeyError 'state', AttributeError (a list), OverflowError (a huge created_at), or an error."""
    entries: dict[str, object] = {
        "good": {"id": "client-mallory/good", "state": "WORKING", "definition": "flows:main", "created_at": 2.0,
                 "updated_at": 3.0, "steps": 1, "tokens": 5, "owner": "spiffe://hivemesh.local/client/mallory"},
        "far": {"id": "client-mallory/far", "state": "WORKING", "created_at": 1e300},  # a time past any date
        "nostate": {"id": "client-mallory/nostate"},
        "list": [1],
        "text-time": {"id": "client-mallory/text-time", "state": "WORKING", "created_at": "yesterday"},
        "huge-int": {"id": "client-mallory/huge-int", "state": "WORKING", "created_at": 10 ** 400},
        "steps": {"id": "client-mallory/steps", "state": "WORKING", "steps": {"many": True}},
        "spoof": {"id": "client-orders/payroll", "state": "COMPLETED"},  # another workload's run, by its id
    }
    async with MeshClient.connect(name="mallory", settings=await mesh_env.settings_for("mallory", "client"),
                                  audit=False) as mesh:
        etcd = etcd_client(mesh.node.etcd)
        try:
            for local, doc in entries.items():
                await etcd.put(f"{WORKFLOW_INDEX}client-mallory/{local}".encode(), json.dumps(doc).encode())
            await etcd.put(f"{WORKFLOW_INDEX}client-mallory/notjson".encode(), b"{not json")
        finally:
            await etcd.close()

    code, out, err = await run_cli(mesh_env, "workflows", "list")
    assert code == 0 and "Traceback" not in err, err
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if "client-mallory/" in line]
    rows = {c[0]: c for c in cells}
    assert set(rows) == {f"client-mallory/{n}" for n in [*entries, "notjson"]}, out
    assert rows["client-mallory/good"][1:6] == ["WORKING", "flows:main", "1", "5", "mallory"], out
    for bad in ("far", "nostate", "list", "text-time", "huge-int", "steps", "spoof", "notjson"):
        assert rows[f"client-mallory/{bad}"][1] == "?", out
        assert rows[f"client-mallory/{bad}"][2].startswith("(malformed index entry: "), out
    assert "client-orders/payroll" not in out
    assert "8 index entries are not a run's summary" in err

    code, out, err = await run_cli(mesh_env, "workflows", "list", "--json", "--state", "WORKING")
    assert code == 0, err
    listed = {r["id"]: r for r in json.loads(out)}
    assert listed["client-mallory/good"]["tokens"] == 5 and "malformed" not in listed["client-mallory/good"]
    assert listed["client-mallory/spoof"] == {"id": "client-mallory/spoof",
                                              "malformed": "its id is not the run it is stored under"}
    assert listed["client-mallory/text-time"]["malformed"] == "created_at is not a number"
    assert listed["client-mallory/far"]["malformed"] == "created_at is not a time"  # 1e300: past any date
    assert len(listed) == len(entries) + 1  # every malformed entry stays listed whatever --state says


class Shady(EchoAgent):
    name = "shady"
    version = "1.0.0\x1b[2J\x1b[H\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\"


class Semver(EchoAgent):
    name = "semver"
    version = "2.0.0-rc.1+build.5"


async def test_an_agent_card_version_must_be_printable(mesh_env: MeshEnv) -> None:
    """Before, Shady registered, and `hivemesh agents` cleared the operator's screen and showed a link."""
    with pytest.raises(InvalidInputError, match=r"card\.version"):
        async with AgentServer(Shady(), await mesh_env.settings_for("shady"), AgentServerConfig(audit=False)):
            pass
    async with AgentServer(Semver(), await mesh_env.settings_for("semver"), AgentServerConfig(audit=False)):
        code, out, err = await run_cli(mesh_env, "agents")
    assert code == 0 and "2.0.0-rc.1+build.5" in out and "shady" not in out, out + err


@pytest.mark.slow
async def test_a2a_register_prints_an_external_cards_name_cleaned(mesh_env: MeshEnv, tmp_path: Path) -> None:
    """The card is the external agent's: before, its name was written raw in the bridge's ready line."""
    card = tools_card()
    card.name = f"Text Tools {ESC}"
    async with serve_a2a(ToolsExecutor(), card) as url:
        log = tmp_path / "bridge.log"
        proc = await _spawn(["-m", "hivemesh.controlplane.cli", "a2a", "register", url, "--name", "tools"],
                            await child_env(mesh_env, "tools", tmp_path / "tools"), log)
        try:
            line = await _first_line(proc, log, 60)
        finally:
            await stop(proc)
    assert line.startswith("a2a-bridge ready agent=tools a2a=Text Tools x\\x1b[2K"), (line, _tail(log))
    assert_clean("hivemesh a2a register", line)


async def _bounded_cli(*args: str) -> tuple[int, str]:
    """The real CLI in a child process allowed 2 GiB of address space: (exit code, stderr). What the test bounds
    is the file read; the limit leaves room for gRPC's threads, each with a stack and a malloc arena (capped at
    two). The limit is set by an exec wrapper (`tests.support.rlimits`): a preexec_fn had this gRPC-running
    process fork, and the forked child died in gRPC's poller before its exec in about one full run in five."""
    command = [sys.executable, "-m", "hivemesh.controlplane.cli", "--certs-dir", "/nonexistent", *args]
    proc = await asyncio.create_subprocess_exec(
        *limited(command, address_space=2 << 30), cwd=REPO, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, err.decode(errors="replace")


async def test_an_endless_file_is_refused_at_the_limit() -> None:
    """Before, `-f /dev/zero` read until a MemoryError traceback (here, at the 2 GiB the child may use)."""
    code, err = await _bounded_cli("policy", "apply", "-f", "/dev/zero")
    assert code == 2 and "/dev/zero is larger than 1,048,576 bytes: refusing to read it" in err, err
    code, err = await _bounded_cli("call", "echo", "-d", "@/dev/zero")
    assert code == 2 and "/dev/zero is larger than 8,388,608 bytes: refusing to read it" in err, err
