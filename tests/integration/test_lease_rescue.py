"""A registration keeps its lease when a keepalive goes to an etcd member that cannot answer.

One real 3-member etcd cluster (mutual TLS, auth). A follower is frozen (SIGSTOP) after the registration's
round-robin channel reached it, so some keepalives go to a member that accepts them and never answers: the one
that does is sent again to every member within the lease's remaining time, and the lease never lapses. The
control plane's hedged etcd requests (`controlplane/etcd_hedge.py`) get through the same frozen member too, and
its leader keeps its term (leader keepalives are rescued the same way), and a replica's audit copy catches up on
the mesh-wide log through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aetcd import rpc

from hivemesh.controlplane.audit.checkpoints import verify_log
from hivemesh.controlplane.audit.shared_log import SharedLog
from hivemesh.controlplane.audit.store import COMMIT_HEDGE_AFTER_S, READ_HEDGE_AFTER_S, AuditStore
from hivemesh.controlplane.etcd_hedge import HedgedEtcd
from hivemesh.controlplane.leader import LeaderElection
from hivemesh.mesh.audit.chain import GENESIS, seal
from hivemesh.mesh.etcd import EtcdAccess, EtcdCluster, EtcdServer, client, wait_connected
from hivemesh.mesh.etcd_roles import ensure_workload_user
from hivemesh.mesh.lease_rescue import refresh_on_members
from hivemesh.mesh.registry import Registration
from hivemesh.mesh.revocation import subject_revoked
from hivemesh.v1.agent_pb2 import AgentCard, Capability
from hivemesh.v1.mesh_pb2 import AgentInstance
from tests.conftest import SessionCa
from tests.support.spawn import freeze
from tests.support.waiting import until

pytestmark = pytest.mark.slow


async def _reaches_every_member(etcd: Any, cluster: EtcdCluster, limit_s: float = 20.0) -> None:
    """Read through etcd's round-robin channel until every member has answered one (each answer names its member
    in its header): only then does a frozen member get its share of the requests that follow."""
    answered: set[int] = set()
    deadline = time.monotonic() + limit_s
    while len(answered) < len(cluster.members):
        assert time.monotonic() < deadline, f"round robin reached {len(answered)} of {len(cluster.members)} members"
        reply = await etcd.kvstub.Range(rpc.RangeRequest(key=b"/probe"), timeout=5.0, metadata=etcd.metadata)
        answered.add(reply.header.member_id)
        await asyncio.sleep(0.01)


def _instance() -> AgentInstance:
    return AgentInstance(
        card=AgentCard(name="alpha", version="1.0.0", capabilities=[Capability(name="extract")]),
        instance_id="a-1", endpoint="127.0.0.1:7001", identity="spiffe://hivemesh.local/agent/alpha",
        packaging="sidecar",
    )


@pytest.fixture
async def cluster(tmp_path: Path, session_ca: SessionCa) -> AsyncIterator[EtcdCluster]:
    """A real 3-member cluster (mutual TLS, auth); whatever a test froze is thawed before it stops."""
    started = EtcdCluster(tmp_path / "etcd", size=3, tls=session_ca.tls)
    await asyncio.to_thread(started.start)
    try:
        yield started
    finally:
        for member in started.members:
            if member.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member.pid, signal.SIGCONT)
        await asyncio.to_thread(started.stop)


async def test_a_keepalive_to_a_frozen_member_is_rescued_within_the_ttl(cluster: EtcdCluster) -> None:
    root = client(cluster.access)
    await wait_connected(root)
    leader = (await root.status()).leader.name
    frozen = next(m for m in cluster.members if m.name != leader)  # a follower: no election to wait out
    assert frozen.pid is not None

    reg = Registration(cluster.access, _instance(), ttl_s=2)
    await reg.start()
    # A control-plane replica's leader election over its own round-robin client, through the same freeze.
    elector = client(cluster.access)
    await wait_connected(elector)
    changes: list[bool] = []
    election = LeaderElection(elector, "a", ttl_s=2, on_change=changes.append, members=cluster.access)
    await election.start()
    try:
        # Let the round-robin channels reach every member (the keepalives rotate over them), then freeze one.
        await _reaches_every_member(await reg._get_client(), cluster)  # the registration's own channel
        await _reaches_every_member(elector, cluster)
        await _reaches_every_member(root, cluster)  # the control plane's requests below
        freeze(frozen.pid)
        frozen_at = time.monotonic()
        while reg.keepalive_rescues < 1:
            assert time.monotonic() - frozen_at < 15, f"no keepalive was rescued: {reg.last_error!r}"
            await asyncio.sleep(0.05)
        rescued_s = time.monotonic() - frozen_at
        # One more TTL with the member still frozen: the lease holds throughout.
        await asyncio.sleep(2.0)  # the observation window, not a wait for something to happen
        assert reg.leases_lost == 0 and reg.registrations == 1, (reg.leases_lost, reg.registrations)
        lease = reg.lease_id
        assert lease is not None
        # Asked of the leader alone: a client spread over the members could ask the frozen one and time out.
        steady = next(m for m in cluster.members if m.name == leader)
        live = client(EtcdAccess(steady.endpoint, cluster.access.tls))
        try:
            assert (await live.get_lease_info(lease)).TTL > 0
        finally:
            await live.close()

        # Directly: the first member to answer wins, the frozen one does not hold the call up (a refresh that
        # waited for every member would meet the frozen one and raise TimeoutError at its 3 s bound)...
        assert await refresh_on_members(cluster.access, lease, 3.0) > 0
        # ...a member alone that never answers is a timeout, bounded: ten times the 0.5 s asked, so a loaded
        # machine's slow turns do not fail it, where a refresh that ignored its bound would wait for ever...
        alone = EtcdAccess(frozen.endpoint, cluster.access.tls)
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await refresh_on_members(alone, lease, 0.5)
        assert time.monotonic() - began < 5.0

        # The control plane's issuing path (grants, agents, workload users) through the same round robin:
        # a request handed to the frozen member is asked of every member after 0.3 s, so none waits it out.
        hedged = HedgedEtcd(root, cluster.access)
        try:
            slowest = 0.0
            for i in range(6):  # round robin hands the frozen member two of them
                began = time.monotonic()
                await hedged.run(lambda etcd: etcd.get_prefix(b"/hivemesh/grants/"))
                await hedged.run(lambda etcd, i=i: ensure_workload_user(etcd, "client", f"hedged-{i % 2}"))
                # The revocation check in front of every issuing RPC (`RevocationGuard`) reads the same way.
                assert await hedged.run(lambda etcd, i=i: subject_revoked(
                    etcd, f"spiffe://hivemesh.local/client/hedged-{i % 2}")) is None
                slowest = max(slowest, time.monotonic() - began)
            assert hedged.hedges >= 1, "no request reached the frozen member (else no test)"
            assert slowest < 2.0, slowest
        finally:
            await hedged.close()
        # The leader kept its term through the freeze: its keepalives that went to the frozen member were
        # rescued by the others, so it never stepped down.
        assert election.rescues >= 1, "no leader keepalive went to the frozen member (else no test)"
        assert changes == [True] and election.terms_won == 1, changes
    finally:
        await election.stop()
        await elector.close()
        await reg.stop()
    # ...and a lease that is gone says so (TTL <= 0), so the registration registers again.
    assert await refresh_on_members(cluster.access, lease, 3.0) <= 0
    await root.close()
    print(f"\nFIGURE lease rescue: keepalive rescued {rescued_s:.2f} s after a follower froze; 0 leases lost; "
          f"{hedged.hedges} of 18 control-plane requests hedged, the slowest three {slowest:.2f} s; "
          f"{election.rescues} leader keepalives rescued, no step-down")


async def _leaders(cluster: EtcdCluster) -> set[str]:
    """The leader each member names ("" for one that names none or does not answer)."""
    names = set()
    for member in cluster.members:
        c = client(EtcdAccess(member.endpoint, cluster.access.tls))
        try:
            names.add((await asyncio.wait_for(c.status(), 5)).leader.name)
        except Exception:  # noqa: BLE001 - a member that cannot say counts as not settled
            names.add("")
        finally:
            await c.close()
    return names


async def test_a_hedged_read_gets_through_the_election_when_the_frozen_member_led(cluster: EtcdCluster) -> None:
    """The leader freezes: the followers' linearizable reads wait for a new leader, then answer "leader
    changed". They are asked again and answer; given up on, the read waited on the frozen leader until the hedge's
    timeout (how one control-plane request failed in a CI run of the multi-host test).

    On a loaded machine the followers can elect a new leader before the read reaches them, and then answer it
    without an error: the leader is then thawed, the cluster settles, and the next leader is frozen (3 at most)."""
    root = client(cluster.access)
    await wait_connected(root)
    await root.put(b"/hivemesh/grants/probe", b"granted")
    # after_s=0: every read is asked of every member at once, so the followers meet the election if it is on.
    hedged = HedgedEtcd(root, cluster.access, after_s=0.0, timeout_s=20.0)
    try:
        got = await hedged.run(lambda etcd: etcd.get(b"/hivemesh/grants/probe"))  # every channel warm
        assert got is not None and got.value == b"granted"
        assert hedged.asked_again == 0, "no election yet, nothing asked again"
        elections = 0
        frozen: EtcdServer | None = None
        while hedged.asked_again == 0 and elections < 3:
            if frozen is not None:  # that election was over before the read met it: thaw, settle, freeze the next
                assert frozen.pid is not None
                os.kill(frozen.pid, signal.SIGCONT)
                deadline = time.monotonic() + 30
                while len(settled := await _leaders(cluster)) != 1 or "" in settled:
                    assert time.monotonic() < deadline, f"the cluster did not settle after a thaw: {settled}"
                    await asyncio.sleep(0.2)
            leader = (await root.status()).leader.name
            frozen = next(m for m in cluster.members if m.name == leader)
            assert frozen.pid is not None
            freeze(frozen.pid)
            elections += 1
            began = time.monotonic()
            got = await hedged.run(lambda etcd: etcd.get(b"/hivemesh/grants/probe"))
            took_s = time.monotonic() - began
            assert got is not None and got.value == b"granted"
        assert hedged.asked_again >= 1, f"in {elections} elections no member answered that it was electing"
        assert frozen is not None
        follower = client(EtcdAccess(next(m for m in cluster.members if m is not frozen).endpoint,
                                     cluster.access.tls))
        try:
            assert (await follower.status()).leader.name != leader, "the followers elected one of themselves"
        finally:
            await follower.close()
    finally:
        await hedged.close()
    await root.close()
    print(f"\nFIGURE hedge through an election: a read while the leader was frozen answered in {took_s:.2f} s, "
          f"members asked again {hedged.asked_again} times ({elections} election(s) frozen)")


@dataclass
class _Sides:
    """Clients of a 3-member cluster for a test that freezes a follower: `root` round robin over every member,
    `leader` of the leader alone (it never meets the freeze), `pinned` of the follower alone (every request meets
    the freeze first: round robin's worst case, made certain)."""

    root: Any
    leader: Any
    pinned: Any
    frozen: EtcdServer

    async def close(self) -> None:
        await asyncio.gather(self.pinned.close(), self.leader.close(), self.root.close())


async def _sides(cluster: EtcdCluster) -> _Sides:
    root = client(cluster.access)
    await wait_connected(root)
    leader = (await root.status()).leader.name
    steady = next(m for m in cluster.members if m.name == leader)
    frozen = next(m for m in cluster.members if m.name != leader)
    assert frozen.pid is not None
    sides = _Sides(root, client(EtcdAccess(steady.endpoint, cluster.access.tls)),
                   client(EtcdAccess(frozen.endpoint, cluster.access.tls)), frozen)
    await asyncio.gather(wait_connected(sides.leader), wait_connected(sides.pinned))
    return sides


async def test_an_audit_copy_catches_up_on_the_shared_log_through_a_frozen_member(
    cluster: EtcdCluster, tmp_path: Path
) -> None:
    """A replica's catch-up reads the mesh-wide audit log through its round-robin client, hedged as the control
    plane wires it (`READ_HEDGE_AFTER_S`): a read handed to a frozen follower is asked of every member, so the
    copy keeps up with what another replica commits. Unhedged, that read waits out its 10 s and fails."""
    sides = await _sides(cluster)
    root, on_leader, frozen = sides.root, sides.leader, sides.frozen  # the writing replica never meets the freeze
    assert frozen.pid is not None
    hedged = HedgedEtcd(root, cluster.access)
    cp = "spiffe://hivemesh.local/controlplane"

    def replica(name: str, etcd: object, **shared: object) -> AuditStore:
        store = AuditStore(tmp_path / name, identity=cp, checkpoint_every=10**9, checkpoint_interval_s=3600)
        store.shared = SharedLog(etcd, store, name, leading=lambda: False, fence=list, poll_s=3600.0, **shared)
        return store

    writer = replica("writer", on_leader)
    copy = replica("copy", root, reads=lambda fn: hedged.run(fn, after_s=READ_HEDGE_AFTER_S, timeout_s=10.0))
    node, seq, prev = "spiffe://hivemesh.local/agent/echo", 0, GENESIS
    try:
        await writer.start()
        await copy.start()
        await _reaches_every_member(root, cluster)  # else round robin may hand the frozen member nothing
        freeze(frozen.pid)
        slowest = 0.0
        for _ in range(6):  # three reads per catch-up: round robin hands the frozen member some of them
            lines = []
            for _ in range(3):
                seq += 1
                line, prev = seal({"v": 1, "kind": "inbound", "node": node, "trace_id": f"t{seq}"}, seq, prev)
                lines.append(line.rstrip(b"\n"))
            await writer.append("spool-1", node, lines)
            began = time.monotonic()
            await copy.sync()
            slowest = max(slowest, time.monotonic() - began)
            assert copy.seq == writer.seq == seq
        assert hedged.hedges >= 1, "no read reached the frozen member (else no test)"
        assert list(copy.lines()) == list(writer.lines())
        assert slowest < 9.0, slowest  # hedged after 2 s; a read waiting out the frozen member takes 10 s
    finally:
        await copy.close()
        await writer.close()
        await hedged.close()
        await sides.close()
    print(f"\nFIGURE audit catch-up through a frozen member: {hedged.hedges} of 18 reads hedged, "
          f"the slowest catch-up {slowest:.2f} s")


async def test_audit_commits_get_through_a_frozen_member(cluster: EtcdCluster, tmp_path: Path) -> None:
    """A replica's commits (shipped batches, its own records) and, as the leader, its checkpoints are etcd
    transactions made under the store's lock, hedged as the control plane wires them (`COMMIT_HEDGE_AFTER_S`).
    Here every request goes first to a frozen follower (round robin's worst case, made certain): each is sent to
    every member after 0.5 s, so none holds the lock, and every append behind it, for the request's whole 5 s.
    Each record is in the log once and the checkpoints verify. Unhedged (commits or checkpoints), an append waits
    out 5 s and fails."""
    sides = await _sides(cluster)
    frozen, pinned = sides.frozen, sides.pinned
    assert frozen.pid is not None
    hedged = HedgedEtcd(pinned, cluster.access)
    cp = "spiffe://hivemesh.local/controlplane"
    store = AuditStore(tmp_path / "writer", identity=cp, checkpoint_every=1, checkpoint_interval_s=3600)
    store.shared = SharedLog(pinned, store, "writer", leading=lambda: True, fence=list, poll_s=3600.0,
                             reads=lambda fn: hedged.run(fn, after_s=READ_HEDGE_AFTER_S, timeout_s=10.0),
                             writes=lambda fn: hedged.run(fn, after_s=COMMIT_HEDGE_AFTER_S, timeout_s=10.0))
    node, seq, prev = "spiffe://hivemesh.local/agent/echo", 0, GENESIS
    rounds = 3
    try:
        await store.start()
        freeze(frozen.pid)
        slowest = 0.0
        for i in range(rounds):
            lines = []
            for _ in range(2):
                seq += 1
                line, prev = seal({"v": 1, "kind": "inbound", "node": node, "trace_id": f"t{seq}"}, seq, prev)
                lines.append(line.rstrip(b"\n"))
            began = time.monotonic()
            assert (await store.append("spool-1", node, lines))[:2] == (seq, prev)
            appended = time.monotonic()
            await store.record({"method": f"own-{i}", "decision": "allow"})
            assert await until(lambda: not store.pending, 15), "the own record was not committed"
            slowest = max(slowest, appended - began, time.monotonic() - appended)
        # Each round: the batch's commit, the own record's commit, and a checkpoint after each that has something
        # new to sign (at least one a round).
        assert hedged.hedges >= 3 * rounds, hedged.hedges
        entries = [json.loads(raw) for raw in store.lines()]
        assert [e["record"]["seq"] for e in entries if e["source"] == "spool-1"] == list(range(1, seq + 1))
        assert [e["record"]["method"] for e in entries if e["source"] == "controlplane"] == [
            f"own-{i}" for i in range(rounds)]
        assert len(store.checkpoints()) >= rounds, len(store.checkpoints())
        report = verify_log(store.lines(), store.checkpoints(), store.public_key)
        assert report.ok, report.problem
        # What shows the hedge is above: every append and own record got through (an unhedged one waits out the
        # frozen member's 5 s and fails), with at least three hedges a round. How long they took is a figure,
        # printed below, not a bound: a loaded machine once took 6.6 s through the hedge.
    finally:
        await store.close()
        await hedged.close()
        await sides.close()
    print(f"\nFIGURE audit commits through a frozen member: {hedged.hedges} requests hedged, the slowest append "
          f"or own record's commit {slowest:.2f} s")


async def test_audit_progress_and_trimming_get_through_a_frozen_member(cluster: EtcdCluster, tmp_path: Path) -> None:
    """Outside the store's lock, the follow loop publishes how far this replica applied the log (a leased key the
    leader trims by) and, as the leader, trims what every replica holds. With every request sent first to a frozen
    follower, both get through, hedged like a commit: the progress key shows the last batch and the trimmed
    batches leave etcd. Unhedged, each of those requests waits out the frozen member and fails, round after
    round: the key never appears (and a key that did would lapse, so the leader would trim past this replica)."""
    from hivemesh.mesh.keyspace import AUDIT_APPLIED, AUDIT_LOG

    sides = await _sides(cluster)
    frozen, pinned, lead = sides.frozen, sides.pinned, sides.leader
    assert frozen.pid is not None
    hedged = HedgedEtcd(pinned, cluster.access)
    store = AuditStore(tmp_path / "writer", identity="spiffe://hivemesh.local/controlplane",
                       checkpoint_every=1000, checkpoint_interval_s=3600)
    # Reads hedge sooner than the control plane's 2 s here, so that a round (a catch-up, then a trim's three
    # reads) takes about a second instead of eight; the writes hedge as the control plane wires them.
    store.shared = SharedLog(pinned, store, "writer", leading=lambda: True, fence=list, poll_s=0.1,
                             min_age_s=0.0, trim_every_s=0.5,
                             reads=lambda fn: hedged.run(fn, after_s=0.3, timeout_s=10.0),
                             writes=lambda fn: hedged.run(fn, after_s=COMMIT_HEDGE_AFTER_S, timeout_s=10.0))
    node, seq, prev = "spiffe://hivemesh.local/agent/echo", 0, GENESIS
    applied_key = f"{AUDIT_APPLIED}writer".encode()

    async def published() -> int:
        kv = await lead.get(applied_key)
        return -1 if kv is None else int(json.loads(kv.value)["seq"])

    async def log_batches() -> int:
        return len(list(await lead.get_prefix(AUDIT_LOG.encode())))

    try:
        await store.start()
        freeze(frozen.pid)
        for _ in range(3):
            seq += 1
            line, prev = seal({"v": 1, "kind": "inbound", "node": node, "trace_id": f"t{seq}"}, seq, prev)
            await store.append("spool-1", node, [line.rstrip(b"\n")])
        assert await log_batches() >= 1
        began = time.monotonic()
        seen, batches_left = -1, -1
        for _ in range(400):  # bounded: 400 looks, ~20 s at most
            seen, batches_left = await published(), await log_batches()
            if seen == store.seq and batches_left == 0:
                break
            await asyncio.sleep(0.05)
        took = time.monotonic() - began
        assert seen == store.seq, f"progress key at {seen}, the replica at {store.seq}"
        assert batches_left == 0, f"{batches_left} batch(es) every replica holds are still in etcd"
        assert hedged.hedges >= 2, hedged.hedges
    finally:
        await store.close()
        await hedged.close()
        await sides.close()
    print(f"\nFIGURE audit progress and trimming through a frozen member: published and trimmed {took:.2f} s after "
          f"the last append, {hedged.hedges} requests hedged")
