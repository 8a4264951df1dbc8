"""Registration and RegistryView against a real etcd: leases, crashes, conflicts, outages and the index."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import aetcd
import pytest

from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError, RegistryUnavailableError
from hivemesh.mesh.etcd import EtcdAccess, EtcdServer, client, parse_endpoints, wait_connected
from hivemesh.mesh.ports import free_port
from hivemesh.mesh.registry import (
    AGENTS_PREFIX,
    Registration,
    RegistryView,
    agent_key,
    default_instance_id,
    read_instances,
)
from hivemesh.mesh.watch import WatchOptions
from hivemesh.v1.agent_pb2 import AgentCard, Capability
from hivemesh.v1.mesh_pb2 import AgentInstance
from tests.support.jitter_proxy import JitterProxy
from tests.support.waiting import until as _until

FAST = WatchOptions(probe_interval_s=0.2, probe_timeout_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.3)


def make_instance(agent: str, instance_id: str, caps: list[str], port: int = 7001) -> AgentInstance:
    return AgentInstance(
        card=AgentCard(name=agent, version="1.0.0", capabilities=[Capability(name=c) for c in caps]),
        instance_id=instance_id,
        endpoint=f"127.0.0.1:{port}",
        identity=f"spiffe://hivemesh.local/agent/{agent}",
        packaging="sidecar",
    )


async def _leases(etcd: aetcd.Client) -> set[int]:
    reply = await etcd.leasestub.LeaseLeases(aetcd.rpc.LeaseLeasesRequest())
    return {lease.ID for lease in reply.leases}


def _ids(view: RegistryView, capability: str) -> list[str]:
    return [i.instance_id for i in view.instances(capability)]


@pytest.fixture
async def view(etcd: aetcd.Client, etcd_server: EtcdServer) -> AsyncIterator[RegistryView]:
    v = RegistryView(etcd_server.access, options=FAST)
    await v.start(timeout=10)
    try:
        yield v
    finally:
        await v.stop()


async def test_register_visible_then_stop_removes_at_once(
    etcd: aetcd.Client, etcd_server: EtcdServer, view: RegistryView
) -> None:
    reg = Registration(etcd_server.access, make_instance("alpha", "a-1", ["extract"]), ttl_s=10)
    await reg.start(timeout=5)
    try:
        assert await view.wait_for_capability("extract", timeout=5)
        (inst,) = view.instances("extract")
        assert inst.instance_id == "a-1" and inst.endpoint == "127.0.0.1:7001"
        assert inst.registered_at_unix_ms > 0
        kv = await etcd.get(agent_key("alpha", "a-1").encode())
        assert kv is not None and kv.lease == reg.lease_id and reg.revision == kv.mod_revision
    finally:
        t0 = time.monotonic()
        await reg.stop()
        await reg.stop()  # idempotent
    # Revoked, not expired: gone far sooner than the 10 s TTL.
    assert await view.cache.wait_for(lambda s: not s, timeout=2)
    assert time.monotonic() - t0 < 2
    assert view.instances("extract") == ()
    assert view.knows_capability("extract"), "a capability once seen stays known (NO_LIVE_INSTANCE)"
    assert not view.knows_capability("never-offered")
    assert await etcd.get(agent_key("alpha", "a-1").encode()) is None


async def test_a_fresh_lease_counts_its_whole_ttl_from_when_it_was_asked_for(etcd_server: EtcdServer) -> None:
    """etcd grants a lease after it is asked for, so the lease lives at least its TTL from then: the first keepalive
    (ttl/3 later) can still be rescued on another member when it fails (ttl/3 after that). Counted from after the
    registration, less an operation timeout, it had no time left then (test_lease_rescue.py's first test)."""
    reg = Registration(etcd_server.access, make_instance("alpha", "a-ttl", ["extract"]), ttl_s=3)
    asked = time.monotonic()
    await reg.start(timeout=5)
    try:
        done = time.monotonic()
        assert reg.registered
        assert asked + 3 <= reg.alive_until <= done + 3, (reg.alive_until - asked, done - asked)
    finally:
        await reg.stop()


async def test_keepalives_keep_their_cadence_and_the_lease_under_200ms_of_round_trip_jitter(
    etcd: aetcd.Client, etcd_server: EtcdServer
) -> None:
    """E6: with every byte to and from etcd held 0-100 ms each way (a round trip jittering by up to 200 ms), a
    2 s lease is refreshed every TTL/3 (from one send to the next, whatever the round trip took) and never lapses:
    the entry is there at every look, 0 leases lost, one registration."""
    (host, port), = parse_endpoints(etcd_server.endpoint)
    proxy = JitterProxy(host, port, max_delay_s=0.1, seed=6)
    await proxy.start()
    reg = Registration(EtcdAccess(proxy.endpoint, etcd_server.access.tls),
                       make_instance("alpha", "jitter", ["extract"]), ttl_s=2)
    key = agent_key("alpha", "jitter").encode()
    try:
        await reg.start(timeout=10)
        began, looks, missing = time.monotonic(), 0, 0
        seen: list[tuple[float, int]] = []  # (when a look first saw it, keepalives answered)
        while time.monotonic() - began < 12.0:  # ~18 keepalives
            looks += 1
            if not seen or reg.keepalives != seen[-1][1]:
                seen.append((time.monotonic(), reg.keepalives))
            missing += await etcd.get(key) is None
            await asyncio.sleep(0.02)  # the sampling interval of the look, not a wait for something
        (t0, n0), (t1, n1) = seen[1], seen[-1]  # from the first change seen to the last
        sent = n1 - n0
        cadence = (t1 - t0) / max(sent, 1) / 2
        assert missing == 0 and reg.leases_lost == 0 and reg.registrations == 1, (missing, reg.leases_lost)
        assert proxy.chunks > 2 * sent, "the keepalives did not go through the proxy"
        # Counted from each answer instead, the cadence was 0.40 of the TTL here (0.33 now).
        assert 0.30 <= cadence <= 0.36, (cadence, sent)
    finally:
        await reg.stop()
        await proxy.stop()
    print(f"\nFIGURE keepalive cadence under 0-200 ms round-trip jitter: every {cadence:.3f} of the TTL "
          f"({sent} keepalives in {t1 - t0:.1f} s), {looks} looks, 0 missing, 0 leases lost")


async def test_default_instance_id_is_valid_and_unique() -> None:
    ids = {default_instance_id() for _ in range(20)}
    assert len(ids) == 20
    reg = Registration("127.0.0.1:1", make_instance("alpha", "", ["x"]))
    assert reg.instance.instance_id.rsplit("-", 2)[1] == str(os.getpid())


_CHILD = """
import asyncio, sys
from pathlib import Path
from hivemesh.mesh.etcd import EtcdAccess, EtcdTls
from hivemesh.mesh.registry import Registration
from hivemesh.mesh.watch import WatchOptions
from hivemesh.v1.agent_pb2 import AgentCard, Capability
from hivemesh.v1.mesh_pb2 import AgentInstance

async def main():
    inst = AgentInstance(card=AgentCard(name="crashy", capabilities=[Capability(name="crash")]),
                         instance_id="c-1", endpoint="127.0.0.1:7009")
    tls = EtcdTls.from_files(*(Path(p) for p in sys.argv[2:5]))
    reg = Registration(EtcdAccess(sys.argv[1], tls), inst, ttl_s=2)
    await reg.start(timeout=10)
    print("READY", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_process_disappears_within_ttl(etcd_server: EtcdServer, view: RegistryView) -> None:
    tls = etcd_server.tls
    assert tls is not None
    proc = subprocess.Popen(  # noqa: ASYNC220 - a real child process is the point of the test
        [sys.executable, "-c", _CHILD, etcd_server.endpoint, str(tls.trusted_ca_file), str(tls.admin_cert_file),
         str(tls.admin_key_file)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert line.strip() == b"READY"
        assert await view.wait_for_capability("crash", timeout=5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        t0 = time.monotonic()
        assert await view.cache.wait_for(lambda s: not s, timeout=2 + 2), "entry must expire within TTL + 2 s"
        assert time.monotonic() - t0 <= 4
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_duplicate_instance_id_refused_without_clobbering(
    etcd: aetcd.Client, etcd_server: EtcdServer
) -> None:
    first = Registration(etcd_server.access, make_instance("alpha", "dup", ["extract"], port=7001))
    second = Registration(etcd_server.access, make_instance("alpha", "dup", ["extract"], port=7002))
    await first.start(timeout=5)
    try:
        leases_before = await _leases(etcd)
        with pytest.raises(FailedPreconditionError) as info:
            await second.start(timeout=5)
        assert "already registered" in info.value.message and "instance_id" in info.value.field_violations
        assert not second.registered
        kv = await etcd.get(agent_key("alpha", "dup").encode())
        assert kv is not None and kv.lease == first.lease_id
        assert AgentInstance.FromString(kv.value).endpoint == "127.0.0.1:7001"
        leases_after = await _leases(etcd)
        assert first.lease_id in leases_after and leases_after <= leases_before, "no lease left behind"
    finally:
        await second.stop()
        await first.stop()


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda i: setattr(i.card, "name", "Bad Name"), "card.name"),
        (lambda i: setattr(i.card, "name", ""), "card.name"),
        (lambda i: setattr(i, "instance_id", "a/b"), "instance_id"),
        (lambda i: setattr(i, "endpoint", "nohost"), "endpoint"),
        (lambda i: setattr(i, "endpoint", "127.0.0.1:99999"), "endpoint"),
        (lambda i: setattr(i, "endpoint", ":7001"), "endpoint"),
        (lambda i: i.card.ClearField("capabilities"), "card.capabilities"),
        (lambda i: i.card.capabilities.add(name="UPPER"), "card.capabilities[1].name"),
        (lambda i: i.card.capabilities.add(name="extract"), "card.capabilities[1].name"),
        (lambda i: setattr(i, "identity", "alpha"), "identity"),
        (lambda i: setattr(i, "packaging", "docker"), "packaging"),
    ],
)
async def test_invalid_instance_refused_with_field_and_nothing_written(
    etcd: aetcd.Client, etcd_server: EtcdServer, mutate: Callable[[AgentInstance], None], field: str
) -> None:
    inst = make_instance("alpha", "a-1", ["extract"])
    mutate(inst)
    with pytest.raises(InvalidInputError) as info:
        Registration(etcd_server.access, inst)
    assert field in info.value.field_violations
    assert field in info.value.message
    assert len(await etcd.get_prefix(AGENTS_PREFIX.encode())) == 0


async def test_lease_lost_reregisters_and_fences_calls_routed_by_the_old_registration(
    etcd: aetcd.Client, etcd_server: EtcdServer, view: RegistryView
) -> None:
    """E2's fencing: readers see the revision that created the entry (an update keeps it), and once the lease is
    lost and the instance registered again, a call routed by the old one is refused; after a deliberate stop the
    last registration's calls are still its own (draining)."""
    inst = make_instance("alpha", "a-1", ["extract"])
    inst.registration_revision = 1  # written by no registrant: the registry says it
    reg = Registration(etcd_server.access, inst, ttl_s=3)
    await reg.start(timeout=5)
    try:
        assert await view.wait_for_capability("extract", timeout=5)
        old_lease, old_rev = reg.lease_id, reg.revision
        assert old_lease is not None
        kv = await etcd.get(agent_key("alpha", "a-1").encode())
        assert kv is not None and kv.create_revision == old_rev > 1
        assert view.instances("extract")[0].registration_revision == old_rev
        assert reg.fence_problem(old_rev) is None
        changed = AgentInstance()
        changed.CopyFrom(inst)
        changed.labels["zone"] = "b"
        await reg.update(changed)  # same registration, new document: the fence stays
        assert await view.cache.wait_for(
            lambda s: any(i.labels.get("zone") == "b" for i in s.values()), timeout=5)
        assert view.instances("extract")[0].registration_revision == old_rev == reg.revision
        await etcd.revoke_lease(old_lease)  # an operator (or an expiry during a long pause) kills the lease
        assert await view.cache.wait_for(lambda s: not s, timeout=2)
        assert await view.wait_for_capability("extract", timeout=3 + 2), "re-registered within ttl/3 + slack"
        assert await _until(lambda: reg.registrations == 2, 2)  # the txn reply may trail the watch event
        assert reg.lease_id not in (None, old_lease) and reg.revision > old_rev
        assert reg.leases_lost == 1 and reg.registrations == 2
        kv = await etcd.get(agent_key("alpha", "a-1").encode())
        assert kv is not None and kv.lease == reg.lease_id and kv.create_revision == reg.revision
        assert view.instances("extract")[0].registration_revision == reg.revision
        problem = reg.fence_problem(old_rev)
        assert problem is not None and f"revision {old_rev}" in problem and f"revision {reg.revision}" in problem
        assert reg.fence_problem(reg.revision) is None
    finally:
        new_rev = reg.revision
        await reg.stop()
    assert reg.fence_problem(new_rev) is None  # deregistered on purpose: its calls drain
    assert reg.fence_problem(old_rev) is not None


def _stand_still(seconds: float) -> None:
    """The fault itself: this process's event loop stands still, as a SIGSTOPped or starved process's does."""
    time.sleep(seconds)  # called from the loop on purpose: blocking it is the fault


async def test_a_process_that_stood_still_past_its_ttl_refuses_calls_fenced_by_its_lease_until_etcd_answers(
    etcd: aetcd.Client, etcd_server: EtcdServer, view: RegistryView
) -> None:
    """E2 "on resume it ... rejects work fenced by the old revision", before it has even heard `lease not found`:
    calls waiting when a paused process resumes were routed by a registration that has most likely expired, and
    they run before the keepalive now due can come back. A stand-still shorter than the lease's known life
    refuses nothing."""
    ttl = 2
    reg = Registration(etcd_server.access, make_instance("alpha", "a-1", ["extract"]), ttl_s=ttl)
    await reg.start(timeout=5)
    try:
        rev = reg.revision
        _stand_still(0.2)
        assert reg.fence_problem(rev) is None
        _stand_still(2 * ttl + 1.0)  # past the TTL: etcd expires the lease meanwhile (it checks every 0.5 s)
        problem = reg.fence_problem(rev)  # the loop has not run since: nothing told the registration yet
        assert problem is not None and "stood still past the lease's TTL" in problem
        assert reg.registered and reg.revision == rev
        assert await _until(lambda: reg.registrations == 2, 5), "registered again once etcd said the lease is gone"
        assert reg.leases_lost == 1 and reg.revision > rev
        assert reg.fence_problem(rev) is not None and reg.fence_problem(reg.revision) is None
    finally:
        await reg.stop()


async def test_registration_survives_etcd_restart(own_etcd: EtcdServer) -> None:
    ttl = 2
    reg = Registration(
        own_etcd.access, make_instance("alpha", "a-1", ["extract"]), ttl_s=ttl,
        backoff_initial_s=0.05, backoff_max_s=0.3,
    )
    await reg.start(timeout=5)
    view = RegistryView(own_etcd.access, options=FAST)
    await view.start(timeout=5)
    try:
        assert await view.wait_for_capability("extract", timeout=5)
        own_etcd.stop()
        await asyncio.sleep(ttl + 0.5)  # the outage outlasts the TTL
        assert _ids(view, "extract") == ["a-1"], "the view keeps routing on its last snapshot"
        own_etcd.start()
        assert await _until(lambda: reg.last_error is None and reg.registered, 2 * ttl + 3)
        # Registered again (or the lease survived the restart) and kept alive: still there well past a TTL.
        probe = client(own_etcd.access)
        await wait_connected(probe)
        try:
            deadline = time.monotonic() + ttl + 1  # past a full TTL: only keepalives keep it
            while time.monotonic() < deadline:
                kv = await probe.get(agent_key("alpha", "a-1").encode())
                if kv is None:  # allowed only while re-registering right after the restart
                    assert await view.wait_for_capability("extract", timeout=ttl + 2)
                else:
                    assert kv.lease == reg.lease_id
                await asyncio.sleep(0.2)
            kv = await probe.get(agent_key("alpha", "a-1").encode())
            assert kv is not None and kv.lease == reg.lease_id
        finally:
            await probe.close()
        assert await view.wait_for_capability("extract", timeout=5)
    finally:
        await view.stop()
        await reg.stop()


async def test_index_two_agents_two_instances_each(
    etcd: aetcd.Client, etcd_server: EtcdServer, view: RegistryView
) -> None:
    regs = [
        Registration(etcd_server.access, make_instance("alpha", "a-2", ["extract", "summarize"], 7002)),
        Registration(etcd_server.access, make_instance("alpha", "a-1", ["extract", "summarize"], 7001)),
        Registration(etcd_server.access, make_instance("beta", "b-1", ["extract", "translate"], 7003)),
        Registration(etcd_server.access, make_instance("beta", "b-2", ["extract", "translate"], 7004)),
    ]
    await asyncio.gather(*(r.start(timeout=5) for r in regs))
    try:
        assert await view.wait_for_capability("extract", count=4, timeout=5)
        assert _ids(view, "extract") == ["a-1", "a-2", "b-1", "b-2"]
        assert _ids(view, "summarize") == ["a-1", "a-2"]
        assert _ids(view, "translate") == ["b-1", "b-2"]
        assert view.instances("nothing") == ()
        caps = view.capabilities()
        assert [(c.capability.name, c.agents, c.instances) for c in caps] == [
            ("extract", ("alpha", "beta"), 4),
            ("summarize", ("alpha",), 2),
            ("translate", ("beta",), 2),
        ]
        assert [(i.card.name, i.instance_id) for i in view.all_instances()] == [
            ("alpha", "a-1"), ("alpha", "a-2"), ("beta", "b-1"), ("beta", "b-2"),
        ]
        assert await read_instances(etcd_server.access) == list(view.all_instances())
        await regs[2].stop()
        await regs[3].stop()
        assert await view.cache.wait_for(lambda s: len(s) == 2, timeout=3)
        assert view.instances("translate") == () and view.knows_capability("translate")
        assert _ids(view, "extract") == ["a-1", "a-2"]
    finally:
        for r in regs:
            await r.stop()


async def test_malformed_entries_skipped(
    etcd: aetcd.Client, etcd_server: EtcdServer, view: RegistryView, caplog: pytest.LogCaptureFixture
) -> None:
    good = make_instance("alpha", "a-1", ["extract"])
    await etcd.put(f"{AGENTS_PREFIX}junk/x".encode(), b"\xff\xff not a protobuf")
    await etcd.put(agent_key("alpha", "wrong-id").encode(), good.SerializeToString())  # key/value mismatch
    await etcd.put(agent_key("alpha", "a-1").encode(), good.SerializeToString())
    assert await view.wait_for_capability("extract", timeout=5)
    assert _ids(view, "extract") == ["a-1"]
    assert len(view.all_instances()) == 1
    assert sum("skipping undecodable" in r.getMessage() for r in caplog.records) == 2


async def test_start_when_etcd_down(own_etcd: EtcdServer) -> None:
    dead = Registration(f"127.0.0.1:{free_port()}", make_instance("alpha", "a-1", ["extract"]), ttl_s=2)
    t0 = time.monotonic()
    with pytest.raises(RegistryUnavailableError):
        await dead.start(timeout=1)
    assert time.monotonic() - t0 < 3 and not dead.registered
    await dead.stop()
    with pytest.raises(RegistryUnavailableError):
        await read_instances(f"127.0.0.1:{free_port()}", timeout=1)

    own_etcd.stop()
    reg = Registration(
        own_etcd.access, make_instance("alpha", "a-1", ["extract"]), ttl_s=2,
        backoff_initial_s=0.05, backoff_max_s=0.3,
    )
    await asyncio.wait_for(reg.start(wait=False), 1)  # returns at once; registers when etcd is back
    try:
        assert not reg.registered
        own_etcd.start()
        assert await _until(lambda: reg.registered, 5)
        (inst,) = await read_instances(own_etcd.access)
        assert inst.instance_id == "a-1" and inst.card.name == "alpha"
    finally:
        t0 = time.monotonic()
        await reg.stop()
        assert time.monotonic() - t0 < 3.5
    assert await read_instances(own_etcd.access) == []
