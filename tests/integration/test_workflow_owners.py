"""Workflow runs are owned (issue 10, TEST_MATRIX H1 "no workload reads ... other runs"), against a real control
plane and a real etcd with mutual TLS and auth.

Three clients join: alpha, beta and alpha.eu (a name-prefix neighbour of alpha). With each one's own certificate,
its etcd user reads and writes its own runs and is refused (etcd: permission denied) on every other run's events,
owner key and index entry and on the index as a whole; the allow/deny table is printed. Through the SDK, another
identity can neither read, resume, cancel nor create under a run it does not own, while a second engine of the
same identity resumes the run. The operator CLI lists and shows every owner's runs, by full or bare id.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aetcd
import pytest
from aetcd import rpc

from hivemesh.controlplane.ca import load_ca
from hivemesh.controlplane.etcd_certs import controlplane_etcd_tls
from hivemesh.controlplane.retention import Retention
from hivemesh.controlplane.retention_config import RetentionConfig
from hivemesh.mesh.errors import PermissionDeniedError
from hivemesh.mesh.etcd import EtcdTls, is_permission_denied, wait_connected
from hivemesh.mesh.etcd import client as etcd_client
from hivemesh.mesh.etcd_roles import CLIENT_ROLE, READWRITE, Grant, ensure_workload_user, reconcile_static_roles
from hivemesh.mesh.keyspace import WORKFLOW_INDEX, WORKFLOWS
from hivemesh.mesh.pki import new_key_and_csr
from hivemesh.sdk import MeshClient
from hivemesh.sdk.workflow import WorkflowEngine, WorkflowRun, WorkflowState, WorkflowStore
from tests.conftest import SessionCa
from tests.support.meshenv import MeshEnv, run_cli

pytestmark = pytest.mark.timeout(120)

RELEASE: dict[str, asyncio.Event] = {}
"""Per-run gates the held flow waits on (module level: a resumed run finds the same gate)."""


async def held_flow(run: WorkflowRun, input: Any) -> dict[str, Any]:
    """Records a note, then waits until the test releases the run (a run that is WORKING while others look)."""
    await run.note("began", {"who": input["who"]})
    if input.get("hold"):
        await RELEASE.setdefault(run.workflow_id, asyncio.Event()).wait()
    return {"done": input["who"]}


async def _outcome(coro: Any) -> bool:
    """True if etcd allowed it, False if it refused with permission denied (anything else fails the test)."""
    try:
        await asyncio.wait_for(coro, 10)
    except Exception as exc:
        if is_permission_denied(exc):
            return False
        raise
    return True


@pytest.fixture
async def clients(mesh_env: MeshEnv) -> AsyncIterator[dict[str, MeshClient]]:
    async with AsyncExitStack() as stack:
        out = {}
        for name in ("alpha", "beta", "alpha.eu"):
            settings = await mesh_env.settings_for(name, "client")
            out[name] = await stack.enter_async_context(MeshClient.connect(name=name, settings=settings))
        yield out


async def _table(etcd: aetcd.Client, runs: dict[str, str]) -> dict[str, tuple[bool, bool]]:
    """(read, write) of every key of every run, and of the index as a whole, for one etcd identity."""
    table: dict[str, tuple[bool, bool]] = {}
    for owner, wid in runs.items():
        for what, key in (("events", f"{WORKFLOWS}{wid}/events/"), ("owner key", f"{WORKFLOWS}{wid}/owner"),
                          ("index entry", f"{WORKFLOW_INDEX}{wid}")):
            k = key.encode()
            read = await _outcome(etcd.get_prefix(k))
            write = await _outcome(etcd.put(k + b"-probe", b"x"))
            if write:
                assert await _outcome(etcd.delete(k + b"-probe"))
            table[f"{owner}'s {what}"] = (read, write)
    table["the whole index"] = (await _outcome(etcd.get_prefix(WORKFLOW_INDEX.encode())),
                                await _outcome(etcd.put(f"{WORKFLOW_INDEX}forged".encode(), b"{}")))
    table["the whole run keyspace"] = (await _outcome(etcd.get_prefix(WORKFLOWS.encode())),
                                       await _outcome(etcd.put(f"{WORKFLOWS}forged/events/1".encode(), b"{}")))
    return table


async def test_each_workload_reads_and_writes_only_its_own_runs(mesh_env: MeshEnv,
                                                                 clients: dict[str, MeshClient]) -> None:
    # Every identity creates and reads its own runs with its own etcd credentials (through the SDK).
    runs: dict[str, str] = {}
    async with AsyncExitStack() as stack:
        engines = {n: await stack.enter_async_context(WorkflowEngine(m)) for n, m in clients.items()}
        for name, engine in engines.items():
            state = await engine.run(held_flow, {"who": name}, workflow_id="wf-same")
            assert state.state == "COMPLETED" and state.output == {"done": name}
            assert state.id == f"client-{name}/wf-same" and (await engine.get("wf-same")).id == state.id
            assert [r["id"] for r in await engine.list()] == [state.id]
            runs[name] = state.id
        beta_only = await engines["beta"].run(held_flow, {"who": "beta"}, workflow_id="wf-beta-only")
        assert beta_only.state == "COMPLETED"

    # The same runs, key by key, with each client's own certificate straight against etcd.
    tables: dict[str, dict[str, tuple[bool, bool]]] = {}
    for name, mesh in clients.items():
        raw = etcd_client(mesh.node.etcd)
        await wait_connected(raw)
        try:
            tables[name] = await _table(raw, runs)
        finally:
            await raw.close()
    print()
    for name, table in tables.items():
        print(f"client {name!r} against etcd (read, write):")
        for row, (r, w) in table.items():
            print(f"  {row:<28} read={'ALLOW' if r else 'deny ':5}  write={'ALLOW' if w else 'deny'}")
    for name, table in tables.items():
        for owner in runs:
            mine = owner == name
            for what in ("events", "owner key", "index entry"):
                assert table[f"{owner}'s {what}"] == (mine, mine), (name, owner, what)
        assert table["the whole index"] == (False, False)
        assert table["the whole run keyspace"] == (False, False)

    # The operator (the real CLI, its own certificate) sees every owner's runs, by full id or unambiguous bare id.
    # Six read-only commands: their processes run at once.
    every, beta, alpha, bare, ambiguous, nobody = await asyncio.gather(
        run_cli(mesh_env, "workflows", "list", "--json"),
        run_cli(mesh_env, "workflows", "list", "--owner", "client-beta", "--json"),
        run_cli(mesh_env, "workflows", "show", runs["alpha"], "--json"),
        run_cli(mesh_env, "workflows", "show", "wf-beta-only", "--json"),
        run_cli(mesh_env, "workflows", "show", "wf-same"),
        run_cli(mesh_env, "workflows", "list", "--owner", "nobody"),
    )
    code, out, err = every
    assert code == 0, err
    assert sorted(r["id"] for r in json.loads(out)) == sorted([*runs.values(), beta_only.id])
    code, out, err = beta
    assert code == 0 and sorted(r["id"] for r in json.loads(out)) == sorted([runs["beta"], beta_only.id]), err
    code, out, err = alpha
    assert code == 0 and json.loads(out)["output"] == {"done": "alpha"}, err
    code, out, err = bare
    assert code == 0 and json.loads(out)["id"] == beta_only.id, err
    code, out, err = ambiguous
    assert code == 1 and "several owners" in err and runs["alpha"] in err and "Traceback" not in err
    code, out, err = nobody
    assert code != 0 and "<kind>-<name>" in err


async def test_only_the_owning_identity_resumes_its_run(clients: dict[str, MeshClient]) -> None:
    alpha, beta = clients["alpha"], clients["beta"]
    ref = f"{__name__}:held_flow"
    began = asyncio.Event()
    async with WorkflowEngine(alpha, lock_ttl_s=2, on_event=lambda _w, kind, _d: began.set() if kind == "note" else None
                              ) as first:
        handle = await first.submit(ref, {"who": "alpha", "hold": True}, workflow_id="wf-held")
        wid = handle.id
        assert wid == "client-alpha/wf-held"
        await asyncio.wait_for(began.wait(), 30)
    # The first engine stopped (as a killed orchestrator would): the run is WORKING with nobody driving it.
    async with WorkflowEngine(beta) as other:
        assert await other.resume_all() == []  # it lists only beta's own runs
        for attempt in (other.resume(wid, wait_s=0), other.get(wid), other.cancel(wid, wait_s=0),
                        other.submit(ref, {"who": "beta"}, workflow_id=wid)):
            with pytest.raises(PermissionDeniedError) as refused:
                await attempt
            assert wid in refused.value.message
    async with WorkflowEngine(alpha) as again:
        resumed = await again.resume_all(wait_s=5)
        assert [h.id for h in resumed] == [wid]
        RELEASE.setdefault(wid, asyncio.Event()).set()
        state = await resumed[0].result(timeout=30)
    assert state.state == "COMPLETED" and state.output == {"done": "alpha"} and len(state.runs) == 2


async def test_the_control_plane_revokes_the_shared_run_grant_of_an_older_store(session_ca: SessionCa,
                                                                                 tmp_path: Path) -> None:
    """A store bootstrapped before runs were owned gave every client read-write on every run (CLIENT_ROLE);
    bootstrap never runs again on it, so the control plane's start-up reconciliation must take that back."""
    server = session_ca.etcd_server(tmp_path / "etcd")
    server.start()
    root = etcd_client(server.endpoint, tls=controlplane_etcd_tls(session_ca.files.certs_dir))
    sid = "spiffe://hivemesh.local/client/alpha"
    key, csr = new_key_and_csr(sid)
    cert = load_ca(session_ca.files.certs_dir).sign_csr(csr, sid)
    alpha = etcd_client(server.endpoint, tls=EtcdTls(session_ca.files.ca_cert.read_bytes(), cert, key))
    try:
        await wait_connected(root)
        stub = rpc.AuthStub(root.channel)
        for old in (Grant(READWRITE, WORKFLOWS), Grant(READWRITE, WORKFLOW_INDEX)):  # the earlier layout's grants
            await stub.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name=CLIENT_ROLE, perm=old.message()))
        await ensure_workload_user(root, "client", "alpha")
        await root.put(f"{WORKFLOW_INDEX}client-beta/wf-1".encode(), b"{}")
        await wait_connected(alpha)
        others = f"{WORKFLOW_INDEX}client-beta/".encode()
        assert await _outcome(alpha.get_prefix(others))  # the hole this closes
        changed = await reconcile_static_roles(root)
        assert sorted(changed) == [f"{CLIENT_ROLE}: revoked READWRITE on {WORKFLOW_INDEX}",
                                   f"{CLIENT_ROLE}: revoked READWRITE on {WORKFLOWS}"]
        assert not await _outcome(alpha.get_prefix(others))
        assert await _outcome(alpha.get_prefix(f"{WORKFLOW_INDEX}client-alpha/".encode()))  # its own: still
        assert await reconcile_static_roles(root) == []  # idempotent
    finally:
        await alpha.close()
        await root.close()
        server.stop()


async def test_retention_deletes_finished_owned_runs_and_never_an_owners_subtree(etcd: aetcd.Client) -> None:
    """A finished run is deleted by its full id; an index key that is not a run id (here one that names an owner,
    as an id from before runs were owned could) is left alone, since its prefix would be that owner's every run."""
    store = WorkflowStore(etcd)
    for wid, last in (("client-bob/wf-done", "completed"), ("client-bob/wf-open", None)):
        state = WorkflowState(wid)
        await store.append(state, "created", {"definition": "tests:x", "input": None, "owner": "bob"})
        if last:
            await store.append(state, last, {"output": 1})
    old = json.dumps({"id": "client-bob", "state": "COMPLETED", "updated_at": 1.0}).encode()
    await etcd.put(f"{WORKFLOW_INDEX}client-bob".encode(), old)
    report = await Retention(etcd, RetentionConfig(history_s=None, workflows_s=0, escalations_s=None,
                                                   revocations_s=None)).run_once()
    assert report.workflows == ["client-bob/wf-done"]
    assert await store.events("client-bob/wf-done") == []
    assert [s["id"] for s in await store.list("client-bob")] == ["client-bob/wf-open"]
    assert (await store.load("client-bob/wf-open")).state == "SUBMITTED"
    assert await etcd.get(f"{WORKFLOW_INDEX}client-bob".encode()) is not None
