"""etcd behind mutual TLS and least-privilege roles (issue 10, TEST_MATRIX H1), against a real etcd 3.5 member.

Without credentials nothing is readable (plaintext and certificate-less TLS are refused in the handshake); with an
agent's, a client's and an operator's own certificate, every prefix is tried for read and write and each allow/deny
table is printed and compared with the intended one; the control plane's certificate may do everything.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aetcd
import pytest
from aetcd import rpc

from hivemesh.controlplane.ca import CaFiles, CertificateAuthority, load_ca
from hivemesh.controlplane.etcd_certs import controlplane_etcd_tls
from hivemesh.mesh.etcd import EtcdServer, EtcdTls, client, is_permission_denied, wait_connected
from hivemesh.mesh.etcd_roles import MAX_COMMON_NAME, ensure_workload_user, etcd_user, prefix_end
from hivemesh.mesh.pki import new_key_and_csr
from tests.conftest import SessionCa
from tests.support.orch_env import wait_until

TD = "hivemesh.local"
# prefix -> (agent 'a' may read, agent 'a' may write); the target of TEST_MATRIX H1.
EXPECTED: dict[str, tuple[bool, bool]] = {
    "/hivemesh/agents/a/": (True, True),
    "/hivemesh/agents/b/": (True, False),
    "/hivemesh/policies/authz/": (True, False),
    "/hivemesh/grants/": (False, False),
    "/hivemesh/trust/": (True, False),
    "/hivemesh/revoked/": (True, False),
    "/hivemesh/join/": (False, False),
    "/hivemesh/status/agent/a/": (True, True),
    "/hivemesh/status/agent/b/": (False, False),
    "/hivemesh/escalations/": (False, False),
    "/hivemesh/workflows/": (False, False),
    "/hivemesh/workflow-index/": (False, False),
    # Its own workflow runs only (mesh/run_ids.py), not a name-prefix neighbour's ('a.eu').
    "/hivemesh/workflows/agent-a/": (True, True),
    "/hivemesh/workflow-index/agent-a/": (True, True),
    "/hivemesh/workflows/agent-b/": (False, False),
    "/hivemesh/workflow-index/agent-b/": (False, False),
    "/hivemesh/workflows/agent-a.eu/": (False, False),
    # Token-budget spend: every agent reads all of it (it adds up every replica's), writes only its own.
    "/hivemesh/budgets/spend/": (True, False),
    "/hivemesh/budgets/spend/a/": (True, True),
    "/hivemesh/budgets/spend/b/": (True, False),
    "/hivemesh/budgets/spend/a.eu/": (True, False),
    # Held calls: its own only.
    "/hivemesh/queue/agent-a/": (True, True),
    "/hivemesh/queue/agent-b/": (False, False),
    # Control-plane material: replica adverts and the leader are read for failover; signing keys, rollout
    # progress and shared state are the control plane's alone.
    "/hivemesh/controlplanes/": (True, False),
    "/hivemesh/controlplane-leader": (True, False),
    "/hivemesh/controlplane-keys": (False, False),
    "/hivemesh/rollouts/": (False, False),
    "/hivemesh/state/": (False, False),
}
# The same attempts with a client's and an operator's own credentials (TEST_MATRIX H1: "each workload").
EXPECTED_CLIENT: dict[str, tuple[bool, bool]] = {
    "/hivemesh/agents/": (True, False),
    "/hivemesh/agents/c/": (True, False),  # a client registers nothing, not even under its own name
    "/hivemesh/policies/": (True, False),
    "/hivemesh/grants/": (False, False),
    "/hivemesh/trust/": (True, False),
    "/hivemesh/revoked/": (True, False),
    "/hivemesh/join/": (False, False),
    "/hivemesh/controlplane-keys": (False, False),
    "/hivemesh/escalations/": (False, False),
    "/hivemesh/budgets/spend/": (False, False),
    "/hivemesh/status/client/c/": (True, True),
    "/hivemesh/workflows/client-c/": (True, True),
    "/hivemesh/workflow-index/client-c/": (True, True),
    "/hivemesh/workflows/client-d/": (False, False),
    "/hivemesh/workflows/agent-a/": (False, False),
}
EXPECTED_OPERATOR: dict[str, tuple[bool, bool]] = {
    # Operators change policies, grants, trust and revocations through the control plane's API (audited),
    # never in etcd directly.
    "/hivemesh/agents/": (True, False),
    "/hivemesh/policies/": (True, False),
    "/hivemesh/grants/": (False, False),
    "/hivemesh/trust/": (True, False),
    "/hivemesh/revoked/": (True, False),
    "/hivemesh/join/": (False, False),
    "/hivemesh/controlplane-keys": (False, False),
    "/hivemesh/state/": (False, False),
    "/hivemesh/status/": (True, False),
    "/hivemesh/escalations/": (True, False),
    "/hivemesh/workflows/": (True, True),
    "/hivemesh/workflow-index/": (True, True),
}


def workload_tls(ca: CertificateAuthority, files: CaFiles, kind: str, name: str) -> EtcdTls:
    """A workload certificate exactly as the control plane signs it at join (its CN is the etcd user)."""
    sid = f"spiffe://{TD}/{kind}/{name}"
    key, csr = new_key_and_csr(sid)
    return EtcdTls(files.ca_cert.read_bytes(), ca.sign_csr(csr, sid), key)


@pytest.fixture
async def root(own_etcd: EtcdServer, session_ca: SessionCa) -> AsyncIterator[aetcd.Client]:
    c = client(own_etcd.endpoint, tls=controlplane_etcd_tls(session_ca.files.certs_dir))
    await wait_connected(c)
    try:
        yield c
    finally:
        await c.close()


async def _outcome(coro: Any) -> bool:
    try:
        await asyncio.wait_for(coro, 5)
    except Exception as exc:
        if is_permission_denied(exc):
            return False
        raise
    return True


async def _watch_allowed(c: aetcd.Client, prefix: bytes) -> bool:
    """A watch on a range the user may not read is created and then cancelled by etcd with PermissionDenied."""
    call = rpc.WatchStub(c.channel).Watch(iter([rpc.WatchRequest(
        create_request=rpc.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix)))]))
    try:
        async with asyncio.timeout(5):
            async for resp in call:
                if resp.canceled:
                    assert "permission denied" in resp.cancel_reason
                    return False
                if resp.created:
                    return True
    finally:
        call.cancel()
    raise AssertionError("the watch stream ended without an answer")


async def test_without_credentials_nothing_is_readable(own_etcd: EtcdServer, root: aetcd.Client,
                                                       session_ca: SessionCa) -> None:
    await root.put(b"/hivemesh/agents/a/1", b"secret")
    plaintext = client(own_etcd.endpoint, timeout=2)
    no_cert = client(own_etcd.endpoint, timeout=2, tls=EtcdTls(session_ca.files.ca_cert.read_bytes()))
    rogue_dir = session_ca.files.certs_dir.parent / "rogue"
    from hivemesh.controlplane.ca import init_ca

    init_ca(rogue_dir, TD)  # same trust domain name, another root: its certificates are not trusted
    rogue = client(own_etcd.endpoint, timeout=2,
                   tls=EtcdTls(session_ca.files.ca_cert.read_bytes(), *_rogue_pair(load_ca(rogue_dir))))
    for who, c in (("plaintext", plaintext), ("TLS without a client certificate", no_cert),
                   ("a certificate from an untrusted root", rogue)):
        try:
            with pytest.raises(aetcd.exceptions.ConnectionFailedError):
                await asyncio.wait_for(c.get(b"/hivemesh/agents/a/1"), 10)
            with pytest.raises(aetcd.exceptions.ConnectionFailedError):
                await asyncio.wait_for(c.get_prefix(b"/"), 10)
        finally:
            await c.close()
        print(f"{who}: refused")


def _rogue_pair(ca: CertificateAuthority) -> tuple[bytes, bytes]:
    sid = f"spiffe://{TD}/agent/a"
    key, csr = new_key_and_csr(sid)
    return ca.sign_csr(csr, sid), key


async def test_agent_credentials_allow_deny_table(own_etcd: EtcdServer, root: aetcd.Client,
                                                  session_ca: SessionCa) -> None:
    ca = load_ca(session_ca.files.certs_dir)
    await ensure_workload_user(root, "agent", "a")
    await ensure_workload_user(root, "agent", "b")
    for prefix in EXPECTED:
        await root.put(prefix.encode() + b"existing", b"v")
    agent = client(own_etcd.endpoint, tls=workload_tls(ca, session_ca.files, "agent", "a"))
    await wait_connected(agent)
    try:
        table = await _try_every_prefix(agent, EXPECTED)
        # Leases: its own may carry its own keys; it may not revoke another's or attach keys to it.
        b = client(own_etcd.endpoint, tls=workload_tls(ca, session_ca.files, "agent", "b"))
        await wait_connected(b)
        try:
            own = await agent.lease(30)
            assert await _outcome(agent.put(b"/hivemesh/agents/a/leased", b"v", lease=own))
            theirs = await b.lease(30)
            await b.put(b"/hivemesh/agents/b/leased", b"v", lease=theirs)
            table["lease: attach a key to b's lease"] = (False, await _outcome(
                agent.put(b"/hivemesh/agents/a/x", b"v", lease=theirs.id)))
            table["lease: revoke b's lease"] = (False, await _outcome(
                agent.leasestub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=theirs.id))))
            assert await root.get(b"/hivemesh/agents/b/leased") is not None
        finally:
            await b.close()
    finally:
        await agent.close()
    _print_table("agent 'a'", table)
    assert {k: v for k, v in table.items() if k in EXPECTED} == EXPECTED
    assert table["lease: attach a key to b's lease"] == (False, False)
    assert table["lease: revoke b's lease"] == (False, False)

    # A client's and an operator's own certificates, against the same member.
    for kind, name, expected in (("client", "c", EXPECTED_CLIENT), ("operator", "admin", EXPECTED_OPERATOR)):
        await ensure_workload_user(root, kind, name)
        for prefix in expected:
            await root.put(prefix.encode() + b"existing", b"v")
        workload = client(own_etcd.endpoint, tls=workload_tls(ca, session_ca.files, kind, name))
        await wait_connected(workload)
        try:
            table = await _try_every_prefix(workload, expected)
        finally:
            await workload.close()
        _print_table(f"{kind} '{name}'", table)
        assert table == expected, kind


async def _try_every_prefix(c: aetcd.Client, expected: dict[str, tuple[bool, bool]]) -> dict[str, tuple[bool, bool]]:
    """(may read, may write) per prefix, tried for real: a range read, a watch (it must agree) and a put."""
    table: dict[str, tuple[bool, bool]] = {}
    for prefix in expected:
        p = prefix.encode()
        read = await _outcome(c.get_prefix(p))
        assert await _watch_allowed(c, p) == read, f"watch and range disagree on {prefix}"
        write = await _outcome(c.put(p + b"new", b"x"))
        if write:
            assert await _outcome(c.delete(p + b"new"))
        table[prefix] = (read, write)
    return table


def _print_table(who: str, table: dict[str, tuple[bool, bool]]) -> None:
    print(f"\n{who} against etcd (read, write):")
    for prefix, (r, w) in table.items():
        print(f"  {prefix:<36} read={'ALLOW' if r else 'deny ':5}  write={'ALLOW' if w else 'deny'}")


async def test_a_long_name_logs_into_etcd_as_itself_not_as_a_name_it_begins_with(
    own_etcd: EtcdServer, root: aetcd.Client, session_ca: SessionCa
) -> None:
    """A Common Name holds 64 characters; `agent:` and a 63-character name do not fit. Cut short, the certificate
    of agent `a...a-evil` named etcd user `agent:a...a`, another agent's, with its registry keys."""
    ca = load_ca(session_ca.files.certs_dir)
    victim, long_name = "a" * 58, "a" * 58 + "-evil"
    for name in (victim, long_name):
        await ensure_workload_user(root, "agent", name)
    users = {etcd_user("agent", victim), etcd_user("agent", long_name), etcd_user("agent", "a" * 58 + "-evi")}
    assert len(users) == 3 and all(len(u) <= MAX_COMMON_NAME for u in users)
    await root.put(f"/hivemesh/agents/{victim}/existing".encode(), b"v")
    agent = client(own_etcd.endpoint, tls=workload_tls(ca, session_ca.files, "agent", long_name))
    await wait_connected(agent)
    try:
        own = await _outcome(agent.put(f"/hivemesh/agents/{long_name}/x".encode(), b"v"))
        theirs = await _outcome(agent.put(f"/hivemesh/agents/{victim}/x".encode(), b"v"))
    finally:
        await agent.close()
    assert (own, theirs) == (True, False)
    assert (await root.get(f"/hivemesh/agents/{victim}/x".encode())) is None
    with pytest.raises(ValueError, match="Common Name"):
        ca.issue_with_new_key(f"spiffe://{TD}/agent/x", common_name="x" * 65, dns_names=[], ttl_s=60)


async def test_controlplane_credentials_may_do_everything(root: aetcd.Client) -> None:
    for prefix in {**EXPECTED, **EXPECTED_CLIENT, **EXPECTED_OPERATOR}:
        key = prefix.encode() + b"cp"
        await root.put(key, b"v")
        assert (await root.get(key)).value == b"v"
        await root.delete(key)
    assert await _outcome(root.get_prefix(b"/"))


async def test_writes_keep_working_while_the_control_plane_adds_users(
    own_etcd: EtcdServer, root: aetcd.Client, session_ca: SessionCa
) -> None:
    """etcd refuses a request whose auth revision went stale while users were added (every join adds one);
    the client retries it, so a node's registration writes never fail because another workload joined."""
    await ensure_workload_user(root, "agent", "a")
    agent = client(own_etcd.endpoint, tls=workload_tls(load_ca(session_ca.files.certs_dir), session_ca.files,
                                                        "agent", "a"))
    await wait_connected(agent)
    failures: list[str] = []
    writes = 0
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal writes
        while not stop.is_set():
            try:
                await agent.put(f"/hivemesh/agents/a/{writes}".encode(), b"v")
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                failures.append(repr(exc))
            writes += 1

    task = asyncio.create_task(writer())
    try:
        for i in range(30):
            await ensure_workload_user(root, "agent", f"joiner-{i}")
            # At least one write sent after this join (the one in flight may have gone before it), whatever the
            # two take on a loaded machine: the count, not the writer's speed, makes the interleaving.
            done = writes
            await wait_until(lambda done=done: writes >= done + 2, 30, f"two writes after join {i}")
    finally:
        stop.set()
        await task
        await agent.close()
    assert writes > 30 and failures == []
