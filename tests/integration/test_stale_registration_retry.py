"""A call refused STALE_REGISTRATION is sent again once the caller's registry view shows the new registration,
with a real etcd, a real agent and real mTLS calls; and the bounds of that (the attempt loop alone, at the end).

An agent whose lease was lost (an etcd pause past its TTL; here its lease is revoked) registers again under a new
revision. A caller whose etcd watch is held back still routes by the old entry, and the agent refuses the call
unrun (mesh/layers/fence.py). With no retry policy and no other instance, that call used to fail although the
agent was alive; it now waits, bounded, for the caller's view to move on and is sent again, free of any budget.
The caller's view is held back by a TCP gate between it and etcd that stops relaying (holding every byte, in
order) until the test opens it again: the refusal is certain to come before the view catches up. A view that
does not move on fails the call with the refusal after a wait of a few seconds, not at its deadline, saying that the
call ran nowhere and may be sent again. A keyed call to a non-idempotent capability is not moved to another instance
by the refusal: an earlier send of its key may have run on the refusing one, which alone remembers the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import aetcd
import pytest

from hivemesh.mesh.errors import AgentUnavailableError, StaleRegistrationError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.instance_ref import instance_key
from hivemesh.mesh.outbound import encode_request
from hivemesh.mesh.outbound.attempts import AttemptError, AttemptParts, Attempts
from hivemesh.mesh.outbound.call import Metadata, OutboundCall
from hivemesh.mesh.outbound.pipeline import OutboundPipeline
from hivemesh.mesh.outbound.selection import InstanceSelector, Liveness, rendezvous
from hivemesh.mesh.registry import RegistryView, agent_key
from hivemesh.mesh.resilience.retry import Backoff, RetryPolicy
from hivemesh.mesh.resilience.traffic import TrafficState
from hivemesh.mesh.resilience.view import NO_OUTBOUND_POLICIES, OutboundPolicies
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.v1 import agent_pb2
from hivemesh.v1.mesh_pb2 import AgentInstance
from tests.support.agents_for_tests import EchoAgent
from tests.support.jitter_proxy import JitterProxy
from tests.support.meshenv import MeshEnv, apply_policies_text
from tests.support.resilience_rig import FlakyAgent
from tests.support.waiting import until

LEASE_TTL_S = 6
"""The agents' lease TTL: short, so an agent notices its revoked lease soon (a keepalive every TTL/3), yet long enough
that a loaded 2-core machine does not let a live lease lapse as well: with 2 s, CI once lost both agents' leases a
second time during the test, and the instance re-registered under a revision past the one the test waited for."""

REFUSED = "refused a call routed by its old registration"
"""What the caller's attempt loop logs when an instance refuses a call as routed by a registration that is gone."""


@pytest.fixture
async def gate(etcd_server: EtcdServer) -> AsyncIterator[JitterProxy]:
    """A relay to etcd, without jitter, that the test holds (every byte kept, in order) and releases."""
    host, _, port = etcd_server.endpoint.rpartition(":")
    g = JitterProxy(host, int(port))
    await g.start()
    try:
        yield g
    finally:
        await g.stop()


@pytest.fixture
async def watcher(etcd_server: EtcdServer) -> AsyncIterator[RegistryView]:
    """A registry view straight on etcd that keeps watching: it tells when an instance registered again."""
    async with RegistryView(etcd_server.access) as view:
        yield view


async def _lose_lease_and_reregister(
    etcd: aetcd.Client, watcher: RegistryView, instance_id: str, agent: str = "echo"
) -> tuple[int, int]:
    """Revoke instance_id's lease (as a pause past the TTL would let it expire); wait until its agent registered
    again. The old and new registration revisions."""
    kv = await etcd.get(agent_key(agent, instance_id).encode())
    assert kv is not None
    old = int(kv.create_revision)
    await etcd.revoke_lease(kv.lease)

    def again(snap: Mapping[str, AgentInstance]) -> bool:
        return any(i.instance_id == instance_id and i.registration_revision > old for i in snap.values())

    assert await watcher.cache.wait_for(again, timeout=20), f"{instance_id} did not register again"
    (new,) = [i.registration_revision for i in watcher.all_instances() if i.instance_id == instance_id]
    return old, new


@dataclasses.dataclass
class _Stale:
    """An agent that registered again while the caller's view (its etcd watch held at the gate) kept the old entry."""

    agent: EchoAgent
    caller: MeshClient
    old: int
    new: int


@contextlib.asynccontextmanager
async def _stale_view(
    mesh_env: MeshEnv, etcd: aetcd.Client, watcher: RegistryView, gate: JitterProxy, policies: str | None
) -> AsyncIterator[_Stale]:
    """One agent instance (lease TTL LEASE_TTL_S) and a caller reaching etcd through the gate, the gate held and the
    agent registered again (its lease revoked), policies (if any) in force at the caller before."""
    agent = EchoAgent("a")
    caller_settings = dataclasses.replace(await mesh_env.settings_for("tester", "client"), etcd=gate.endpoint)
    async with (
        AgentServer(agent, await mesh_env.settings_for("echo"),
                    AgentServerConfig(instance_id="echo-a", lease_ttl_s=LEASE_TTL_S)) as server,
        MeshClient.connect(name="tester", settings=caller_settings) as caller,
    ):
        if policies is not None:
            await apply_policies_text(mesh_env.etcd, policies)
            assert await until(lambda: caller.node.traffic.policy.retries("echo") is not None, 15)
        assert await caller.node.registry.wait_for_capability("echo", 1, timeout=15)
        assert (await caller.call("echo", {"text": "warm"}, timeout=15))["served_by"] == "a"
        gate.hold()  # the caller's watch hears nothing from here on
        try:
            old, new = await _lose_lease_and_reregister(etcd, watcher, "echo-a")
            # The agent must know its new registration (until then it says only that the old one lost its lease).
            reg = server.registration
            assert reg is not None and await until(lambda: reg.registered and reg.revision == new, 15)
            assert [i.registration_revision for i in caller.instances("echo")] == [old]  # the caller's view is stale
            yield _Stale(agent, caller, old, new)
        finally:
            gate.release()


NO_RETRIES = """
kind: retries
name: none
description: a policy that allows no retry at all
spec: {attempts: 1}
"""


@pytest.mark.parametrize("policies", [None, NO_RETRIES], ids=["no-retry-policy", "retries-attempts-1"])
async def test_a_call_refused_by_a_lost_registration_is_sent_again_once_the_caller_sees_the_new_one(
    mesh_env: MeshEnv, etcd: aetcd.Client, watcher: RegistryView, gate: JitterProxy, caplog: pytest.LogCaptureFixture,
    policies: str | None,
) -> None:
    caplog.set_level(logging.INFO, logger="hivemesh.mesh.outbound.attempts")
    async with _stale_view(mesh_env, etcd, watcher, gate, policies) as stale:
        ran = stale.agent.calls
        # One instance, no retry to spend, a deadline far off: the call is refused, then waits for the view.
        call = asyncio.create_task(stale.caller.call("echo", {"text": "again"}, timeout=30))
        refused = await until(lambda: call.done() or any(REFUSED in r.getMessage() for r in caplog.records), 20)
        assert refused, "the call routed by the old registration was never refused"
        gate.release()  # the caller's watch catches up: the new registration shows
        out = await asyncio.wait_for(call, 30)
        assert out["served_by"] == "a" and out["text"] == "again"
        assert stale.agent.calls == ran + 1, "the call ran other than exactly once"
        assert [i.registration_revision for i in stale.caller.instances("echo")] == [stale.new]


async def test_a_stream_refused_by_a_lost_registration_is_sent_again_once_the_caller_sees_the_new_one(
    mesh_env: MeshEnv, etcd: aetcd.Client, watcher: RegistryView, gate: JitterProxy, caplog: pytest.LogCaptureFixture,
) -> None:
    """InvokeStream's own attempt loop (mesh/outbound/pipeline.py) waits for the view as the unary loop does."""
    caplog.set_level(logging.INFO, logger="hivemesh.mesh.outbound.pipeline")

    async def words() -> list[str]:
        return [item async for item in stale.caller.stream("shout", {"text": "held back"}, timeout=30)]

    async with _stale_view(mesh_env, etcd, watcher, gate, None) as stale:
        call = asyncio.create_task(words())
        refused = await until(lambda: call.done() or any(
            "refused a stream routed by its old registration" in r.getMessage() for r in caplog.records), 20)
        assert refused and not call.done(), "the stream was not refused, or ended at the refusal"
        gate.release()
        assert await asyncio.wait_for(call, 30) == ["HELD", "BACK"]
        assert [i.registration_revision for i in stale.caller.instances("echo")] == [stale.new]


async def test_a_view_that_does_not_move_on_fails_the_call_with_the_refusal_after_a_bounded_wait(
    mesh_env: MeshEnv, etcd: aetcd.Client, watcher: RegistryView, gate: JitterProxy
) -> None:
    async with _stale_view(mesh_env, etcd, watcher, gate, None) as stale:
        ran = stale.agent.calls
        began = time.monotonic()
        with pytest.raises(StaleRegistrationError) as info:
            await stale.caller.call("echo", {"text": "again"}, timeout=30)
        waited = time.monotonic() - began
        # It waited for the view (a few seconds), not for the deadline, and failed with the refusal itself.
        assert 2.0 <= waited < 20.0, f"waited {waited:.1f} s"
        assert f"revision {stale.old}" in info.value.message and f"revision {stale.new}" in info.value.message
        assert info.value.metadata.get("fence") == str(stale.old)
        assert stale.agent.calls == ran


KEY = "order-7"
RAN_NOWHERE = "ran on no instance and may be sent again"
"""What the refusal a call fails with says once no attempt of it may have run."""


@pytest.mark.parametrize("earlier", ["finished", "running"])
async def test_a_keyed_call_refused_by_its_instance_is_not_moved_to_another_where_it_would_run_twice(
    mesh_env: MeshEnv, etcd: aetcd.Client, watcher: RegistryView, gate: JitterProxy, earlier: str
) -> None:
    """Two instances of a non-idempotent capability; an earlier send of the key ran (finished, or still running) on
    the instance the key leads to, which then registered again while the caller's view kept its old entry. The
    re-send of the key is refused there unrun. Moved to the other instance, whose memory of keys is its own, it
    ran the effect a second time; kept, it fails with a refusal that says it ran nowhere and may be sent again,
    and sent again once the view moved on, it gets the first run's answer: the effect happened once."""
    agents = {tag: FlakyAgent(tag) for tag in ("a", "b")}
    caller_settings = dataclasses.replace(await mesh_env.settings_for("tester", "client"), etcd=gate.endpoint)
    async with contextlib.AsyncExitStack() as stack:
        servers = {tag: await stack.enter_async_context(AgentServer(
            a, await mesh_env.settings_for("flaky"),
            AgentServerConfig(instance_id=f"flaky-{tag}", lease_ttl_s=LEASE_TTL_S)))
            for tag, a in agents.items()}
        caller = await stack.enter_async_context(MeshClient.connect(name="tester", settings=caller_settings))
        assert await caller.node.registry.wait_for_capability("charge", 2, timeout=15)
        target = max(caller.instances("charge"), key=lambda i: rendezvous(KEY, instance_key(i))).instance_id
        tag = target.removeprefix("flaky-")
        mine, other = agents[tag], agents["b" if tag == "a" else "a"]
        if earlier == "running":
            mine.first_call_delay = 12.0  # the first run of the key is still running when the re-send comes
        first = asyncio.create_task(caller.call("charge", {}, timeout=40, idempotency_key=KEY))
        assert await until(lambda: mine.started[KEY] == 1, 15)
        if earlier == "finished":
            assert (await first)["effects"] == 1  # its answer lost, say: a resumed workflow sends the step again
        gate.hold()  # the caller's watch hears nothing from here on
        try:
            old, new = await _lose_lease_and_reregister(etcd, watcher, target, "flaky")
            reg = servers[tag].registration
            assert reg is not None and await until(lambda: reg.registered and reg.revision == new, 15)
            assert old in [i.registration_revision for i in caller.instances("charge") if i.instance_id == target]
            with pytest.raises(StaleRegistrationError) as info:
                await caller.call("charge", {}, timeout=30, idempotency_key=KEY)
            assert other.started[KEY] == 0, "the re-send of the key ran on another instance"
            assert mine.started[KEY] == 1 and (earlier == "finished" or not first.done())
            assert f"revision {old}" in info.value.message and RAN_NOWHERE in info.value.message
            assert "same idempotency key" in info.value.message
        finally:
            gate.release()
        # At or past `new`: the view moved on (a later registration, should the lease lapse again, counts too).
        assert await until(lambda: any(i.instance_id == target and i.registration_revision >= new
                                       for i in caller.instances("charge")), 15)
        again = await caller.call("charge", {}, timeout=30, idempotency_key=KEY)  # joins or replays the first run
        assert again == await first and again["served_by"] == tag and again["effects"] == 1
        assert mine.effects[KEY] == 1 and other.started[KEY] == 0 and mine.started[KEY] == 1


# --- the attempt loop alone: its registry view is a list the test changes, an attempt a plain async callable ------
class _View:
    """The registry view selection reads: instances of capability "work" whose registrations the test renews."""

    def __init__(self, ids: Sequence[str], *, idempotent: bool) -> None:
        card = agent_pb2.AgentCard(name="w", capabilities=[agent_pb2.Capability(name="work", idempotent=idempotent)])
        self.items = [AgentInstance(instance_id=i, identity="spiffe://t/agent/w", card=card, registration_revision=1)
                      for i in ids]
        self._coming: list[tuple[float, AgentInstance]] = []

    def instances(self, capability: str) -> Sequence[AgentInstance]:
        now = time.monotonic()
        self.items += [i for at, i in self._coming if at <= now]
        self._coming = [(at, i) for at, i in self._coming if at > now]
        return tuple(self.items) if capability == "work" else ()

    def knows_capability(self, capability: str) -> bool:
        return capability == "work"

    def register_again(self, instance_id: str) -> None:
        """The instance's new registration shows (a new entry: entries are never changed in place)."""
        for n, i in enumerate(self.items):
            if i.instance_id == instance_id:
                renewed = AgentInstance()
                renewed.CopyFrom(i)
                renewed.registration_revision = i.registration_revision + 1
                self.items[n] = renewed

    def lose_lease(self, instance_id: str, *, back_after_s: float | None) -> None:
        """As a caller's current watch applies a lost lease: the instance's entry is deleted now, and (unless None)
        its new registration shows back_after_s later (the DELETE and the PUT are two events, ~100 ms apart)."""
        (old,) = [i for i in self.items if i.instance_id == instance_id]
        self.items.remove(old)
        if back_after_s is not None:
            renewed = AgentInstance()
            renewed.CopyFrom(old)
            renewed.registration_revision = old.registration_revision + 1
            self._coming.append((time.monotonic() + back_after_s, renewed))


def _attempts(view: _View, send: Callable[[AgentInstance], bytes], policies: OutboundPolicies = NO_OUTBOUND_POLICIES,
              *, deadline_s: float = 10.0, key: str = "") -> tuple[Attempts, list[tuple[str, int]]]:
    """An attempt loop over view whose attempts answer send(instance); and the (instance, fence) of every send."""
    sent: list[tuple[str, int]] = []

    async def prepare(call: OutboundCall, instance: AgentInstance) -> Metadata:
        return call.metadata

    async def send_one(call: OutboundCall, instance: AgentInstance, md: Metadata, timeout: float | None) -> bytes:
        sent.append((instance_key(instance), instance.registration_revision))
        return send(instance)

    selector = InstanceSelector(Liveness(view), TrafficState())
    parts = AttemptParts(selector, prepare, send_one, lambda _i: None)
    call = OutboundCall("work", b"req", (), time.monotonic() + deadline_s, None, key)
    return Attempts(parts, call, policies), sent


def _stale(instance: AgentInstance) -> AttemptError:
    return AttemptError(StaleRegistrationError(f"routed by revision {instance.registration_revision}",
                                               metadata={"fence": str(instance.registration_revision)}),
                        never_sent=False)


def _raise_stale(instance: AgentInstance) -> bytes:
    """An attempt refused as routed by the registration the view shows, which never moves on."""
    raise _stale(instance)


async def test_the_re_send_spends_no_retry_budget_even_when_the_policy_allows_none() -> None:
    view = _View(["a"], idempotent=True)

    def send(instance: AgentInstance) -> bytes:
        if instance.registration_revision == 1:
            view.register_again("a")  # refused by the old registration; the new one shows right after
            raise _stale(instance)
        return b"ok"

    policy = RetryPolicy(attempts=3, backoff=Backoff(base_s=0.0, max_s=0.0), budget_ratio=0.0, budget_min_per_s=0.0)
    attempts, sent = _attempts(view, send, OutboundPolicies(None, None, None, policy))
    raw, instance = await attempts.run()
    assert raw == b"ok" and instance.registration_revision == 2
    assert sent == [("w/a", 1), ("w/a", 2)] and attempts.retries == 0 and attempts.attempt == 1


async def test_re_sends_after_stale_refusals_are_bounded_when_the_view_keeps_moving() -> None:
    view = _View(["a"], idempotent=True)

    def send(instance: AgentInstance) -> bytes:
        view.register_again("a")  # every registration is gone by the time a call routed by it arrives
        raise _stale(instance)

    attempts, sent = _attempts(view, send)
    began = time.monotonic()
    with pytest.raises(StaleRegistrationError, match="revision 4"):
        await attempts.run()
    assert [fence for _, fence in sent] == [1, 2, 3, 4]  # the first send and three re-sends, then the refusal
    assert time.monotonic() - began < 5.0  # each re-send went as soon as the view moved: nothing was waited out


async def test_a_keyed_call_refused_by_its_instance_waits_for_the_view_instead_of_resending_in_a_loop() -> None:
    """A keyed non-idempotent call goes to the instance its key hashes to, tried or not: refused there as routed
    by an old registration, it used to be sent there again and again until its deadline."""
    view = _View(["a", "b"], idempotent=False)

    def send(instance: AgentInstance) -> bytes:
        raise _stale(instance)  # the view never shows the new registration

    attempts, sent = _attempts(view, send, deadline_s=1.0, key="order-1")
    with pytest.raises(StaleRegistrationError):
        await attempts.run()
    assert len(sent) == 1


async def test_a_call_that_ran_nowhere_fails_saying_it_may_be_sent_again_and_a_keyed_one_with_its_key() -> None:
    """Refused unrun by the instance its key leads to, a keyed call stays there (another instance does not remember
    the key: an earlier send of it may have run there), and the caller hears that nothing ran, so it may send the call
    again with the same key; an unkeyed call refused by the only instance hears that nothing ran."""
    view = _View(["a", "b"], idempotent=False)
    attempts, sent = _attempts(view, _raise_stale, deadline_s=1.0, key="order-1")
    with pytest.raises(StaleRegistrationError) as info:
        await attempts.run()
    assert len(sent) == 1 and attempts.retries == 0
    assert info.value.message.startswith("routed by revision 1; ") and info.value.metadata == {"fence": "1"}
    assert RAN_NOWHERE in info.value.message and "with the same idempotency key" in info.value.message

    attempts, sent = _attempts(_View(["a"], idempotent=False), _raise_stale, deadline_s=1.0)
    with pytest.raises(StaleRegistrationError) as info:
        await attempts.run()
    assert len(sent) == 1 and RAN_NOWHERE in info.value.message and "idempotency key" not in info.value.message


async def test_a_refusal_after_an_attempt_that_may_have_run_does_not_say_the_call_ran_nowhere() -> None:
    view = _View(["a", "b"], idempotent=False)
    outcomes: list[AttemptError] = [AttemptError(AgentUnavailableError("connection broke mid-call"), never_sent=False)]

    def send(instance: AgentInstance) -> bytes:
        raise outcomes.pop() if outcomes else _raise_stale(instance)

    policy = RetryPolicy(attempts=2, backoff=Backoff(base_s=0.0, max_s=0.0))
    attempts, sent = _attempts(view, send, OutboundPolicies(None, None, None, policy), deadline_s=1.0, key="order-1")
    with pytest.raises(StaleRegistrationError) as info:
        await attempts.run()
    assert len(sent) == 2 and sent[0] == sent[1]  # retried on the instance of its key, refused there
    assert RAN_NOWHERE not in info.value.message
    assert "an earlier attempt of the call failed AGENT_UNAVAILABLE and may have run" in info.value.message


def _key_of(instance_id: str, ids: Sequence[str]) -> str:
    """An idempotency key that rendezvous hashing leads to instance_id among ids."""
    return next(key for key in (f"order-{n}" for n in range(1000))
                if max(ids, key=lambda i: rendezvous(key, f"w/{i}")) == instance_id)


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed-one-instance", "keyed-two-instances"])
async def test_a_call_refused_once_its_entry_is_deleted_waits_for_the_new_registration_not_another_instance(
    keyed: bool,
) -> None:
    """A caller whose watch is current has applied the lost lease's DELETE of the refusing entry before the new
    registration shows: the call used to fail NO_LIVE_INSTANCE (one instance), and a keyed one went to the other
    instance, which does not remember its key (the run twice the refusal must not cause)."""
    ids = ["a", "b"] if keyed else ["a"]
    view = _View(ids, idempotent=not keyed)

    def send(instance: AgentInstance) -> bytes:
        if instance.instance_id == "a" and instance.registration_revision == 1:
            view.lose_lease("a", back_after_s=0.1)
            raise _stale(instance)
        return b"ok"

    attempts, sent = _attempts(view, send, key=_key_of("a", ids) if keyed else "")
    raw, instance = await attempts.run()
    assert raw == b"ok" and (instance.instance_id, instance.registration_revision) == ("a", 2)
    assert sent == [("w/a", 1), ("w/a", 2)] and attempts.retries == 0


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed-one-instance", "keyed-two-instances"])
async def test_a_call_refused_by_an_entry_deleted_for_good_fails_with_the_refusal_after_the_wait(keyed: bool) -> None:
    """The new registration never shows: the call fails with the refusal (nothing ran, it may be sent again), not
    NO_LIVE_INSTANCE, and a keyed one is not sent to the other instance even then."""
    ids = ["a", "b"] if keyed else ["a"]
    view = _View(ids, idempotent=not keyed)

    def send(instance: AgentInstance) -> bytes:
        if instance.instance_id == "a":
            view.lose_lease("a", back_after_s=None)
            raise _stale(instance)
        return b"ok"

    attempts, sent = _attempts(view, send, deadline_s=1.0, key=_key_of("a", ids) if keyed else "")
    with pytest.raises(StaleRegistrationError) as info:
        await attempts.run()
    assert sent == [("w/a", 1)]
    assert RAN_NOWHERE in info.value.message and ("same idempotency key" in info.value.message) == keyed


class _Gap:
    """The real registry as a caller's current watch shows it around a lost lease: the agent's entry by an earlier
    registration (the one the call is routed and refused by), then, once refused() holds, no entry for
    GAP_S (the DELETE applied, the PUT not yet), then the agent's real, newer registration."""

    GAP_S = 0.2

    def __init__(self, registry: RegistryView, refused: Callable[[], bool]) -> None:
        self._registry, self._refused = registry, refused
        self.gap_began: float | None = None

    def instances(self, capability: str) -> Sequence[AgentInstance]:
        real = self._registry.instances(capability)
        if not self._refused():
            old = []
            for i in real:
                earlier = AgentInstance()
                earlier.CopyFrom(i)
                earlier.registration_revision = i.registration_revision - 1
                old.append(earlier)
            return tuple(old)
        if self.gap_began is None:
            self.gap_began = time.monotonic()
        return () if time.monotonic() - self.gap_began < self.GAP_S else real

    def knows_capability(self, capability: str) -> bool:
        return self._registry.knows_capability(capability)


async def test_a_stream_refused_once_its_entry_is_deleted_waits_for_the_new_registration(
    mesh_env: MeshEnv, caplog: pytest.LogCaptureFixture,
) -> None:
    """InvokeStream's loop: refused by a real agent as routed by an old registration, the entry then gone from the
    caller's view for a moment; it used to fail NO_LIVE_INSTANCE, it now waits and streams from the new one."""
    caplog.set_level(logging.INFO, logger="hivemesh.mesh.outbound.pipeline")
    agent = EchoAgent("a")
    async with (
        AgentServer(agent, await mesh_env.settings_for("echo"), AgentServerConfig(instance_id="echo-a")),
        MeshClient.connect(name="tester", settings=await mesh_env.settings_for("tester", "client")) as caller,
    ):
        registry = caller.node.registry
        assert await registry.wait_for_capability("shout", 1, timeout=15)
        out = caller.node.outbound
        gap = _Gap(registry, lambda: any(
            "refused a stream routed by its old registration" in r.getMessage() for r in caplog.records))
        pipeline = OutboundPipeline(Liveness(gap), out.tokens, out.channels)
        chunks = [agent_pb2.InvokeChunk.FromString(raw) async for raw, _ in pipeline.invoke_stream(
            encode_request("shout", b'{"text": "held back"}'), capability="shout", timeout=30)]
        assert [c.data for c in chunks if c.data] == [b'"HELD"', b'"BACK"'] and chunks[-1].final
        assert gap.gap_began is not None, "the stream was never refused"
