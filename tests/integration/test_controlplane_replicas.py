"""Two control-plane replicas in one process over the session etcd: what they share and how they hand over.

One set of signing keys for both (kept in etcd where no workload can read it), tokens from either verify with the
one published key set, a rotation on one reaches the other, exactly one leads the once-per-mesh duties, both
advertise themselves, and a clean stop hands leadership over at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane.retention import Retention
from hivemesh.controlplane.retention_config import RetentionConfig
from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.controlplane_endpoints import discover
from hivemesh.mesh.etcd import EtcdServer, EtcdTls, client, is_permission_denied, wait_connected
from hivemesh.mesh.keyspace import CONTROLPLANE_KEYS
from hivemesh.mesh.tokens import JWKS_KEY, KeySet, TokenVerifier
from hivemesh.mesh.trustdoc import verify_jwks
from hivemesh.sdk import MeshClient
from hivemesh.v1 import trust_pb2
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, run_cli
from tests.support.spawn import freeze

AUDIENCE = f"spiffe://{TRUST_DOMAIN}/agent/echo"


async def _eventually(check: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> float:
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < limit_s, f"{what} not within {limit_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _retention(server: ControlPlaneServer) -> Retention:
    return next(f for f in server._features if isinstance(f, Retention))


async def test_two_replicas_share_keys_lead_once_and_hand_over(
    mesh_env: MeshEnv, etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    a = mesh_env.controlplane
    b = ControlPlaneServer(ControlPlaneConfig(
        etcd_endpoints=etcd_server.endpoint, certs_dir=mesh_env.certs.certs_dir, state_dir=tmp_path / "b-state",
        trust_domain=TRUST_DOMAIN, leader_ttl_s=2, retention=RetentionConfig(interval_s=0.2),
    ))
    await b.start()
    op_b = ControlPlaneClient.from_certs_dir(b.address, mesh_env.certs.certs_dir)
    certs = mesh_env.certs
    operator_etcd = client(etcd_server.endpoint, tls=EtcdTls.from_files(certs.ca_cert, certs.operator_cert,
                                                                        certs.operator_key))
    mesh = MeshClient.connect(name="runner", settings=await mesh_env.settings_for("runner", "client"), audit=False)
    await mesh.start()
    try:
        assert a.replica is not None and b.replica is not None
        # One leader: the replica that started first; the other waits, and runs no retention pass.
        assert a.replica.election.is_leader and not b.replica.election.is_leader
        assert b.replica.election.leader == a.replica.replica_id
        await asyncio.sleep(0.5)  # several of b's retention intervals
        assert _retention(a).passes >= 1 and _retention(b).passes == 0

        # One key set: b adopted a's keys; a token b issues verifies with the key set published in etcd.
        assert a.keys is not None and b.keys is not None
        assert [k.kid for k in b.keys.published()] == [k.kid for k in a.keys.published()]
        issued = await op_b.issue_token(AUDIENCE, ["echo"])
        got = await etcd.get(JWKS_KEY)  # the key set every node verifies with, signed by the CA
        keyset = KeySet.from_jwks(verify_jwks(got.value, certs.ca_cert.read_bytes()).jwks_json)
        verifier = TokenVerifier(keyset, issuer=f"spiffe://{TRUST_DOMAIN}/controlplane", audience=AUDIENCE)
        claims = verifier.verify(issued.token, capability="echo", peer_thumbprint=op_b.workload.thumbprint)
        assert claims.subject == op_b.workload.spiffe_id

        # A rotation on b reaches a (a's next token is signed by the new key once it activates).
        resp = await op_b.call(op_b.trust.RotateSigningKey,
                               trust_pb2.RotateSigningKeyRequest(activate_after_seconds=1))
        new_kid = next(k.kid for k in resp.keys if k.state == "pending")

        async def a_knows() -> bool:
            return a.keys is not None and new_kid in {k.kid for k in a.keys.published()}

        await _eventually(a_knows, 5, "the rotated key on the other replica")

        # The shared keys are etcd root's only; the adverts are every workload's to read.
        await wait_connected(operator_etcd)
        with pytest.raises(Exception) as denied:
            await operator_etcd.get(CONTROLPLANE_KEYS.encode())
        assert is_permission_denied(denied.value)
        adverts = await discover(operator_etcd)
        assert {x.controlplane for x in adverts} == {a.address, b.address}
        assert {x.join for x in adverts} == {a.join_address, b.join_address}
        code, stdout, stderr = await run_cli(mesh_env, "controlplanes", "--json")  # what an operator sees
        assert code == 0, stderr
        listed = json.loads(stdout)
        assert listed["leader"] == a.replica.replica_id
        assert {(r["controlplane"], r["leader"]) for r in listed["replicas"]} == {(a.address, True), (b.address, False)}
        learner = ControlPlaneClient(b.address, mesh_env.operator.workload, TRUST_DOMAIN)
        learner.learn([x.controlplane for x in adverts])
        assert learner.address == b.address and set(learner.addresses) == {a.address, b.address}
        await learner.close()

        # A node configured with a alone finds b in etcd (its client can fail over to it).
        node_cp = mesh.node.controlplane

        async def node_knows_b() -> bool:
            return node_cp.addresses == [a.address, b.address]

        await _eventually(node_knows_b, 5, "the node discovering b")

        # A clean stop revokes the leader's lease: b leads at once (not after the TTL), its retention runs,
        # and a's advert is gone.
        stopped = time.monotonic()
        await a.stop(0.2)

        async def b_leads() -> bool:
            return b.replica is not None and b.replica.election.is_leader

        handover = await _eventually(b_leads, 2.0, "b leading")
        assert [x.controlplane for x in await discover(etcd)] == [b.address]
        passes = _retention(b).passes
        await _eventually(lambda: _async(_retention(b).passes > passes), 2.0, "b's retention pass")
        # The node's next token comes from b: a is gone, and the node was only ever told about a.
        assert (await node_cp.issue_token(AUDIENCE, ["echo"])).token and node_cp.address == b.address
        print(f"\nFIGURE clean control-plane handover: {handover:.2f} s (stop took {time.monotonic() - stopped:.2f} s)")
    finally:
        await mesh.close()
        await operator_etcd.close()
        await op_b.close()
        await b.stop(0.2)


async def _async(value: bool) -> bool:
    return value


async def test_a_leader_cut_off_from_etcd_steps_down_on_its_own_clock(own_etcd: EtcdServer) -> None:
    """etcd frozen (SIGSTOP): no keepalive comes back and etcd never says the lease is gone; the leader stops
    leading before its TTL could have run out at etcd, and after etcd returns exactly one replica leads, under a
    new term that fences off the old one's writes."""
    import os
    import signal

    from hivemesh.controlplane.leader import LeaderElection
    from hivemesh.mesh.keyspace import CONTROLPLANE_LEADER

    c1, c2 = client(own_etcd.access), client(own_etcd.access)
    a = LeaderElection(c1, "a", ttl_s=2)
    b = LeaderElection(c2, "b", ttl_s=2)
    pid = own_etcd.pid
    assert pid is not None
    try:
        await wait_connected(c1)
        await wait_connected(c2)
        await a.start()
        await b.start()
        assert a.is_leader and not b.is_leader and b.leader == "a"
        old_term = a.term
        key = CONTROLPLANE_LEADER.encode()
        assert (await c1.transaction(compare=a.fence(), success=[], failure=[]))[0]  # the fence holds while a leads

        paused = time.monotonic()
        freeze(pid)

        async def a_stepped_down() -> bool:
            return not a.is_leader

        stepped = await _eventually(a_stepped_down, 3.0, "a stepping down")
        assert stepped < 2.0 and not b.is_leader  # before etcd could expire the lease; b cannot lead either
        os.kill(pid, signal.SIGCONT)

        async def one_leads() -> bool:
            return a.is_leader or b.is_leader

        back = await _eventually(one_leads, 8.0, "a leader after etcd came back")
        assert a.is_leader != b.is_leader  # (a again, if etcd took its keepalive before expiring its lease)
        leader, follower = (a, b) if a.is_leader else (b, a)
        term = leader.term
        await leader.stop()  # hands over at once; the new term fences off every write of the old ones

        async def follower_leads() -> bool:
            return follower.is_leader

        await _eventually(follower_leads, 2.0, "the other replica leading")
        assert follower.term > term >= old_term
        t = c1.transactions
        for stale in {old_term, term}:
            assert not (await c1.transaction(compare=[t.create(key) == stale], success=[], failure=[]))[0]
        assert (await c1.transaction(compare=follower.fence(), success=[], failure=[]))[0]
        print(f"\nFIGURE leader cut off from etcd: stepped down {stepped:.2f} s after the pause (TTL 2 s); a leader "
              f"again {back:.2f} s after etcd resumed ({time.monotonic() - paused:.2f} s in all)")
    finally:
        os.kill(pid, signal.SIGCONT)
        await a.stop()
        await b.stop()
        await c1.close()
        await c2.close()
