"""The outbound attempt loop alone, without gRPC: real selection, traffic state, policies and breakers, with
plain async callables standing in for the network hop (what an agent answered is the test's script).

Proves: retries within the policy, the budget refusing a retry, server pushback waited out, the deadline
ending the loop, failover of a never-sent request free of budget, affinity of a keyed non-idempotent call,
the token resent once, and the instance and capability breakers steering and stopping calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
import pytest

from hivemesh.mesh.errors import (
    AgentError,
    AgentUnavailableError,
    CircuitOpenError,
    DeadlineExceededError,
    HivemeshError,
    OverloadedError,
    StaleRegistrationError,
    TokenExpiredError,
)
from hivemesh.mesh.instance_ref import instance_key
from hivemesh.mesh.outbound.attempts import MAY_HAVE_RUN, AttemptError, AttemptParts, Attempts
from hivemesh.mesh.outbound.call import Metadata, OutboundCall
from hivemesh.mesh.outbound.selection import InstanceSelector, Liveness
from hivemesh.mesh.resilience.breaker import BreakerPolicy, State
from hivemesh.mesh.resilience.kinds import BreakerSettings
from hivemesh.mesh.resilience.retry import Backoff, RetryPolicy
from hivemesh.mesh.resilience.traffic import TrafficState
from hivemesh.mesh.resilience.view import NO_OUTBOUND_POLICIES, OutboundPolicies
from hivemesh.v1 import agent_pb2, mesh_pb2

NO_WAIT = Backoff(base_s=0.0, max_s=0.0)


class _Registry:
    """The registry view selection reads: fixed instances of one capability, each id "agent/instance" or a bare
    instance id of agent "w"."""

    def __init__(self, capability: str, ids: Sequence[str], *, idempotent: bool) -> None:
        self.capability = capability
        self.items = []
        for name in ids:
            agent, _, instance = name.rpartition("/")
            card = agent_pb2.AgentCard(name=agent or "w", capabilities=[
                agent_pb2.Capability(name=capability, idempotent=idempotent)])
            self.items.append(mesh_pb2.AgentInstance(
                instance_id=instance, identity=f"spiffe://t/agent/{agent or 'w'}", card=card))

    def instances(self, capability: str) -> Sequence[mesh_pb2.AgentInstance]:
        return self.items if capability == self.capability else []

    def knows_capability(self, capability: str) -> bool:
        return capability == self.capability


class _Held:
    """A script entry: the instance holds the attempt until its timeout, then it fails DEADLINE_EXCEEDED."""


class _Agents:
    """The network hop as plain async callables: answers each send from a script of outcomes in order."""

    def __init__(self, script: Sequence[Exception | bytes | _Held] = ()) -> None:
        self.script = list(script)
        self.sent: list[tuple[str, float | None]] = []
        self.forgotten: list[str] = []

    async def prepare(self, call: OutboundCall, instance: mesh_pb2.AgentInstance) -> Metadata:
        return [*call.metadata, ("authorization", "Bearer t")]

    async def send(
        self, call: OutboundCall, instance: mesh_pb2.AgentInstance, md: Metadata, timeout: float | None
    ) -> bytes:
        assert ("authorization", "Bearer t") in md
        self.sent.append((instance_key(instance), timeout))
        outcome = self.script.pop(0) if self.script else b"ok"
        if isinstance(outcome, _Held):
            assert timeout is not None
            await asyncio.sleep(timeout)  # held without an answer until the attempt's deadline
            raise AttemptError(DeadlineExceededError("Deadline Exceeded"), never_sent=False)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def forget(self, instance: mesh_pb2.AgentInstance) -> None:
        self.forgotten.append(instance.instance_id)


class _Rig:
    def __init__(self, ids: Sequence[str] = ("a", "b"), *, idempotent: bool = True) -> None:
        self.state = TrafficState()
        self.liveness = Liveness(_Registry("work", ids, idempotent=idempotent))
        self.selector = InstanceSelector(self.liveness, self.state)

    def attempts(
        self, agents: _Agents, policies: OutboundPolicies = NO_OUTBOUND_POLICIES, *,
        deadline_s: float | None = 5.0, key: str = "",
    ) -> Attempts:
        parts = AttemptParts(self.selector, agents.prepare, agents.send, agents.forget)
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        return Attempts(parts, OutboundCall("work", b"req", (), deadline, None, key), policies)


def _retries(policy: RetryPolicy, breakers: BreakerSettings | None = None) -> OutboundPolicies:
    return OutboundPolicies(None, None, breakers, policy)


def sent_failure(err: HivemeshError | None = None) -> AttemptError:
    return AttemptError(err or AgentUnavailableError("connection broke mid-call"), never_sent=False)


def never_sent() -> AttemptError:
    return AttemptError(AgentUnavailableError("failed to connect"), never_sent=True)


async def test_a_retryable_failure_is_retried_until_an_answer_within_the_attempts() -> None:
    rig = _Rig()
    agents = _Agents([sent_failure(), sent_failure(), b"third"])
    attempts = rig.attempts(agents, _retries(RetryPolicy(attempts=3, backoff=NO_WAIT)))
    raw, instance = await attempts.run()
    assert raw == b"third" and len(agents.sent) == 3
    assert attempts.retries == 2 and attempts.attempt == 3
    assert instance_key(instance) == agents.sent[-1][0]


async def test_retries_stop_at_the_policy_attempts_with_the_real_error() -> None:
    rig = _Rig()
    agents = _Agents([sent_failure(), sent_failure(), sent_failure(), b"never reached"])
    attempts = rig.attempts(agents, _retries(RetryPolicy(attempts=2, backoff=NO_WAIT)))
    with pytest.raises(AgentUnavailableError):
        await attempts.run()
    assert len(agents.sent) == 2 and attempts.retries == 1


async def test_a_non_retryable_code_and_a_non_idempotent_unkeyed_call_are_not_retried() -> None:
    rig = _Rig()
    agents = _Agents([sent_failure(AgentError("bug"))])
    with pytest.raises(AgentError):
        await rig.attempts(agents, _retries(RetryPolicy(backoff=NO_WAIT))).run()
    assert len(agents.sent) == 1
    rig = _Rig(idempotent=False)
    agents = _Agents([sent_failure()])
    with pytest.raises(AgentUnavailableError):
        await rig.attempts(agents, _retries(RetryPolicy(backoff=NO_WAIT))).run()
    assert len(agents.sent) == 1  # it may have run: sending it again could run it twice


async def test_a_keyed_non_idempotent_call_is_retried_on_the_instance_its_key_hashes_to() -> None:
    rig = _Rig(("a", "b", "c", "d"), idempotent=False)
    for key in ("k1", "k2", "k3"):
        agents = _Agents([sent_failure(), sent_failure(), b"ok"])
        await rig.attempts(agents, _retries(RetryPolicy(attempts=3, backoff=NO_WAIT)), key=key).run()
        assert len(agents.sent) == 3 and len({i for i, _ in agents.sent}) == 1  # the one that remembers the key


async def test_the_retry_budget_refuses_a_retry_beyond_its_allowance() -> None:
    rig = _Rig()
    policy = RetryPolicy(attempts=3, backoff=NO_WAIT, budget_ratio=0.0, budget_min_per_s=0.1, budget_window_s=10)
    agents = _Agents([sent_failure(), b"ok", sent_failure(), b"never reached"])
    assert (await rig.attempts(agents, _retries(policy)).run())[0] == b"ok"  # the one retry the budget holds
    with pytest.raises(AgentUnavailableError):
        await rig.attempts(agents, _retries(policy)).run()
    assert len(agents.sent) == 3
    assert rig.state.budget("work", policy).denied == 1


async def test_the_servers_pushback_is_waited_out_and_a_pushback_past_the_deadline_fails_at_once() -> None:
    rig = _Rig()
    policy = RetryPolicy(attempts=2, backoff=NO_WAIT, retryable=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}))
    agents = _Agents([sent_failure(OverloadedError("busy", retry_after_s=0.2)), b"ok"])
    started = time.monotonic()
    assert (await rig.attempts(agents, _retries(policy)).run())[0] == b"ok"
    assert time.monotonic() - started >= 0.2
    agents = _Agents([sent_failure(OverloadedError("busy", retry_after_s=30.0)), b"never reached"])
    started = time.monotonic()
    with pytest.raises(OverloadedError):
        await rig.attempts(agents, _retries(policy), deadline_s=5.0).run()
    assert time.monotonic() - started < 5.0 and len(agents.sent) == 1


async def test_the_deadline_ends_the_loop_and_bounds_each_try() -> None:
    rig = _Rig()
    agents = _Agents()
    with pytest.raises(DeadlineExceededError):
        await rig.attempts(agents, deadline_s=-0.001).run()
    assert agents.sent == []  # nothing sent once the deadline passed
    agents = _Agents()
    await rig.attempts(agents, _retries(RetryPolicy(per_try_timeout_s=0.5)), deadline_s=30.0).run()
    assert agents.sent[0][1] == 0.5  # the per-try timeout, being shorter than what is left
    agents = _Agents()
    await rig.attempts(agents, deadline_s=None).run()
    assert agents.sent[0][1] is None


async def test_a_never_sent_request_fails_over_free_of_budget_and_marks_the_instance_suspect() -> None:
    rig = _Rig()
    agents = _Agents([never_sent(), b"ok"])
    attempts = rig.attempts(agents)  # no retry policy at all
    raw, instance = await attempts.run()
    first = agents.sent[0][0]
    assert raw == b"ok" and instance_key(instance) != first and attempts.retries == 0
    assert rig.liveness.is_suspect(first) and not rig.liveness.is_suspect(instance_key(instance))
    agents = _Agents([never_sent(), never_sent()])
    with pytest.raises(AgentUnavailableError):
        await rig.attempts(agents).run()  # every instance unreachable, no policy to retry with
    assert len(agents.sent) == 2


async def test_an_agents_sidecar_that_could_not_reach_its_agent_fails_over_as_never_sent() -> None:
    """AGENT_UNAVAILABLE from an agent's sidecar that could not connect to its agent (ErrorInfo `may_have_run`
    "false") ran nothing: the call goes to another instance, unkeyed and non-idempotent as it is, free of any
    budget. One whose agent went away under it ("true") may have run: not sent again, even with a retry policy."""
    rig = _Rig(("a", "b"), idempotent=False)
    nothing = AgentUnavailableError("agent w cannot be reached by its sidecar", metadata={MAY_HAVE_RUN: "false"})
    agents = _Agents([sent_failure(nothing), b"ok"])
    attempts = rig.attempts(agents)  # no retry policy at all
    raw, instance = await attempts.run()
    first = agents.sent[0][0]
    assert raw == b"ok" and instance_key(instance) != first and attempts.retries == 0
    assert rig.liveness.is_suspect(first)  # its agent is not there: others first for a while
    rig = _Rig(("a", "b"), idempotent=False)
    ran = AgentUnavailableError("agent w went away during the call", metadata={MAY_HAVE_RUN: "true"})
    agents = _Agents([sent_failure(ran), b"never reached"])
    with pytest.raises(AgentUnavailableError, match="went away"):
        await rig.attempts(agents, _retries(RetryPolicy(attempts=3, backoff=NO_WAIT))).run()
    assert len(agents.sent) == 1


async def test_a_call_refused_as_routed_by_a_gone_registration_goes_elsewhere_even_unkeyed_and_non_idempotent() -> None:
    """STALE_REGISTRATION says the instance ran nothing (mesh/layers/fence.py): the call goes to another instance,
    free of any budget, although a call that may have run could not be sent again; no breaker counts it."""
    rig = _Rig(("a", "b"), idempotent=False)
    settings = BreakerSettings("b", instance=BreakerPolicy(consecutive_failures=1, open_s=60, max_open_s=60),
                               capability=None, max_ejected_share=1.0)
    agents = _Agents([sent_failure(StaleRegistrationError("routed by revision 7; this one is 9")), b"ok"])
    attempts = rig.attempts(agents, OutboundPolicies(None, None, settings, None))  # no retry policy
    raw, instance = await attempts.run()
    first = agents.sent[0][0]
    assert raw == b"ok" and instance_key(instance) != first and attempts.retries == 0 and attempts.attempt == 1
    assert rig.state.peek_instance_breaker("work", first).state is State.CLOSED  # type: ignore[union-attr]
    assert not rig.liveness.is_suspect(first) and not rig.liveness.is_unanswering(first)
    # The only instance: nothing else may take it, and the caller hears why.
    rig = _Rig(("a",), idempotent=False)
    agents = _Agents([sent_failure(StaleRegistrationError("routed by revision 7; this one is 9")), b"never reached"])
    with pytest.raises(StaleRegistrationError, match="revision 7"):
        await rig.attempts(agents, deadline_s=0.5).run()  # the view never moves on: it waits the deadline out
    assert len(agents.sent) == 1


HELD_S = 0.2  # the deadline of the calls an instance holds in these tests


async def test_an_instance_that_held_a_call_until_its_deadline_gets_no_calls_while_another_answers() -> None:
    rig = _Rig(("a", "b", "c"))
    agents = _Agents([_Held()])
    with pytest.raises(DeadlineExceededError):
        await rig.attempts(agents, deadline_s=HELD_S).run()  # no retry policy: the caller sees the timeout
    held = agents.sent[0][0]
    assert rig.liveness.is_unanswering(held) and not rig.liveness.is_suspect(held)
    agents = _Agents()
    for _ in range(6):
        await rig.attempts(agents).run()
    assert held not in {i for i, _ in agents.sent} and len({i for i, _ in agents.sent}) == 2
    # With no other instance to take it, it is still used; its answer ends the suspicion.
    rig = _Rig(("a",))
    with pytest.raises(DeadlineExceededError):
        await rig.attempts(_Agents([_Held()]), deadline_s=HELD_S).run()
    assert rig.liveness.is_unanswering("w/a")
    agents = _Agents()
    assert (await rig.attempts(agents).run())[0] == b"ok"
    assert [i for i, _ in agents.sent] == ["w/a"] and not rig.liveness.is_unanswering("w/a")


async def test_a_timeout_with_almost_no_time_left_or_answered_at_once_says_nothing_about_the_instance() -> None:
    rig = _Rig()
    agents = _Agents([_Held()])
    with pytest.raises(DeadlineExceededError):
        await rig.attempts(agents, deadline_s=0.05).run()
    assert not rig.liveness.is_unanswering(agents.sent[0][0])
    # An instance that answers DEADLINE_EXCEEDED at once (its deadline too short to queue, say) did answer.
    agents = _Agents([sent_failure(DeadlineExceededError("too late to queue"))])
    with pytest.raises(DeadlineExceededError):
        await rig.attempts(agents, deadline_s=HELD_S).run()
    assert not rig.liveness.is_unanswering(agents.sent[0][0])


async def test_a_keyed_re_send_keeps_to_the_instance_that_held_its_first_attempt() -> None:
    """The timed-out attempt may still run there: a re-send of its key must reach the instance remembering it."""
    rig = _Rig(("a", "b", "c", "d"), idempotent=False)
    agents = _Agents([_Held(), _Held(), b"ok"])
    policy = _retries(RetryPolicy(attempts=3, backoff=NO_WAIT, per_try_timeout_s=HELD_S,
                                  retryable=frozenset({grpc.StatusCode.DEADLINE_EXCEEDED})))
    await rig.attempts(agents, policy, key="k1").run()
    assert len(agents.sent) == 3 and len({i for i, _ in agents.sent}) == 1
    assert not rig.liveness.is_unanswering(agents.sent[0][0])  # it answered in the end


async def test_a_refused_token_is_forgotten_and_the_call_resent_once() -> None:
    rig = _Rig(("a",))
    agents = _Agents([sent_failure(TokenExpiredError("expired")), b"ok"])
    attempts = rig.attempts(agents)
    assert (await attempts.run())[0] == b"ok"
    assert agents.forgotten == ["a", "a"] and attempts.retries == 0
    agents = _Agents([sent_failure(TokenExpiredError("expired")), sent_failure(TokenExpiredError("again"))])
    with pytest.raises(TokenExpiredError):
        await rig.attempts(agents).run()
    assert len(agents.sent) == 2


async def test_an_ejected_instance_gets_no_calls_and_a_breaker_refusal_fails_over() -> None:
    rig = _Rig(("a", "b", "c", "d"))
    settings = BreakerSettings("b", instance=BreakerPolicy(consecutive_failures=1, open_s=60, max_open_s=60),
                               capability=None, max_ejected_share=0.5)
    agents = _Agents([sent_failure(AgentError("bug"))])
    with pytest.raises(AgentError):
        await rig.attempts(agents, _retries(RetryPolicy(backoff=NO_WAIT), settings)).run()
    bad = agents.sent[0][0]
    assert rig.state.peek_instance_breaker("work", bad).state is State.OPEN  # type: ignore[union-attr]
    agents = _Agents()
    for _ in range(6):
        await rig.attempts(agents, _retries(RetryPolicy(backoff=NO_WAIT), settings)).run()
    assert bad not in {i for i, _ in agents.sent}
    # max_ejected_share 0.5 of 4: a second ejection is allowed, a third is not.
    agents = _Agents([sent_failure(AgentError("bug")), sent_failure(AgentError("bug"))])
    for _ in range(2):
        with pytest.raises(AgentError):
            await rig.attempts(agents, _retries(RetryPolicy(backoff=NO_WAIT), settings)).run()
    states = [rig.state.peek_instance_breaker("work", f"w/{i}") for i in "abcd"]
    assert sum(1 for b in states if b is not None and b.state is State.OPEN) == 2


async def test_instances_of_two_agents_that_share_an_instance_id_are_told_apart() -> None:
    """An instance id is unique only under its agent: x's "r1" unreachable, or ejected, says nothing of y's."""
    rig = _Rig(("x/r1", "y/r1"))
    agents = _Agents([never_sent(), b"ok"])
    raw, instance = await rig.attempts(agents).run()
    first, other = agents.sent[0][0], instance_key(instance)
    assert raw == b"ok" and {first, other} == {"x/r1", "y/r1"}
    assert rig.liveness.is_suspect(first) and not rig.liveness.is_suspect(other)
    agents = _Agents()
    for _ in range(4):
        await rig.attempts(agents).run()
    assert {i for i, _ in agents.sent} == {other}  # the suspect one skipped, its namesake not
    rig = _Rig(("x/r1", "y/r1", "z/r2"))
    settings = BreakerSettings("b", instance=BreakerPolicy(consecutive_failures=1, open_s=60, max_open_s=60),
                               capability=None, max_ejected_share=0.5)
    agents = _Agents([sent_failure(AgentError("bug"))])
    with pytest.raises(AgentError):
        await rig.attempts(agents, _retries(RetryPolicy(backoff=NO_WAIT), settings)).run()
    bad = agents.sent[0][0]
    agents = _Agents()
    for _ in range(6):
        await rig.attempts(agents, _retries(RetryPolicy(backoff=NO_WAIT), settings)).run()
    assert {i for i, _ in agents.sent} == {"x/r1", "y/r1", "z/r2"} - {bad}  # only the one ejected gets none


async def test_an_open_capability_breaker_refuses_the_call_without_sending() -> None:
    rig = _Rig()
    settings = BreakerSettings("b", instance=None, capability=BreakerPolicy(consecutive_failures=2, open_s=60,
                                                                            max_open_s=60))
    agents = _Agents([sent_failure(AgentError("bug")), sent_failure(AgentError("bug"))])
    for _ in range(2):
        with pytest.raises(AgentError):
            await rig.attempts(agents, _retries(RetryPolicy(backoff=NO_WAIT), settings)).run()
    with pytest.raises(CircuitOpenError):
        await rig.attempts(agents, _retries(RetryPolicy(backoff=NO_WAIT), settings)).run()
    assert len(agents.sent) == 2


async def test_each_attempts_span_names_its_instance_try_number_and_the_breaker_state_it_was_sent_in() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from hivemesh.mesh import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        rig = _Rig()
        settings = BreakerSettings("b", instance=BreakerPolicy(consecutive_failures=5, open_s=60, max_open_s=60),
                                   capability=None)
        agents = _Agents([sent_failure()])
        await rig.attempts(agents, _retries(RetryPolicy(backoff=NO_WAIT), settings)).run()
        with_breakers = exporter.get_finished_spans()
        exporter.clear()
        await _Rig().attempts(_Agents()).run()  # no breakers policy: no breaker state to name
        [without] = exporter.get_finished_spans()
    finally:
        tracing.disable()
        provider.shutdown()
    assert [s.name for s in with_breakers] == ["attempt work", "attempt work"]
    first, second = (s.attributes or {} for s in with_breakers)
    assert [first["hivemesh.instance"], second["hivemesh.instance"]] == [i.split("/")[1] for i, _ in agents.sent]
    assert (first["hivemesh.retry.attempt"], second["hivemesh.retry.attempt"]) == (1, 2)
    assert first["hivemesh.breaker.state"] == second["hivemesh.breaker.state"] == "closed"
    assert first["hivemesh.reason"] and "hivemesh.reason" not in second  # the failed try carries its reason
    assert "hivemesh.breaker.state" not in (without.attributes or {})
