"""The attempt loop of one unary call: breakers, failover, retries with backoff and budget, the deadline.

    capability breaker → (pick an instance → instance breaker → send) until an answer or a final error:
    never sent (or refused by an agent's sidecar that could not reach its agent: `ran_nothing`): fail over (free of
    any budget); sent and failed: retry if retryable, resendable, within the budget and the deadline, after the
    backoff (or the server's pushback, whichever is longer); refused as routed by
    a registration that is gone (STALE_REGISTRATION): another instance, free of any budget, unless the call is keyed
    to the refusing one; with none left, sent again, free of any budget, once the registry view shows the newer
    registration (`StaleRefusals`); failed with the refusal, saying whether it may be sent again, if it does not;
    ended by gRPC mid-call (the agent went away): said in the mesh's words, with when a resend is safe (`went_away`);
    ended by gRPC at its deadline: said naming the agent and the deadline, in seconds and whose it was (`timed_out`)

It knows nothing of gRPC channels: an attempt is two async callables (`Prepare`: credentials for an
instance; `Send`: send with a timeout, raising `AttemptError`), so the loop is tested without a network.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from hivemesh.mesh import tracing
from hivemesh.mesh.errors import (
    AgentUnavailableError,
    CircuitOpenError,
    DeadlineExceededError,
    HivemeshError,
    NoLiveInstanceError,
    StaleRegistrationError,
    TokenExpiredError,
)
from hivemesh.mesh.instance_ref import instance_key
from hivemesh.mesh.outbound.call import PER_TRY, POLICY, Metadata, OutboundCall, deadline_words, idempotent
from hivemesh.mesh.outbound.events import OutboundEvents
from hivemesh.mesh.outbound.selection import InstanceSelector, Liveness
from hivemesh.mesh.resilience.breaker import DEFAULT_FAILURE_CODES, CircuitBreaker
from hivemesh.mesh.resilience.kinds import RETRIES, TIMEOUTS, BreakerSettings
from hivemesh.mesh.resilience.retry import RetryBudget, may_resend
from hivemesh.mesh.resilience.view import OutboundPolicies
from hivemesh.v1 import mesh_pb2

log = logging.getLogger(__name__)

Instance = mesh_pb2.AgentInstance
Result = tuple[bytes, Instance]
TOKEN_REFUSALS = frozenset({"TOKEN_EXPIRED", "TOKEN_INVALID"})


class AttemptError(Exception):
    """What a `Send` raises when one attempt failed: the mesh error, and whether the request certainly never
    reached the agent (it could not even connect), which makes failing over free."""

    def __init__(self, error: HivemeshError, *, never_sent: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.never_sent = never_sent


Prepare = Callable[[OutboundCall, Instance], Awaitable[Metadata]]
"""The outgoing metadata (token) of an attempt on an instance; a HivemeshError refuses the call locally."""
Send = Callable[[OutboundCall, Instance, Metadata, "float | None"], Awaitable[bytes]]
"""Send the call to an instance with that metadata and per-try timeout: the response bytes, or AttemptError."""
PolicyNamed = Callable[[str, str], str]
"""(policy kind, capability) -> "kind/name" of the policy of that kind in force for the capability ("": none)."""


@dataclass(frozen=True, slots=True)
class AttemptParts:
    """What every call's attempts share: selection (liveness + traffic state) and how to send one attempt."""

    selector: InstanceSelector
    prepare: Prepare
    send: Send
    forget_token: Callable[[Instance], None]
    """Drop the cached token for an instance's identity (the target refused it: expired or rotated)."""
    events: OutboundEvents | None = None
    """Told of retries the budget refused and instances ejected (the node's metrics)."""
    policy_named: PolicyNamed | None = None
    """Names the policy that set a deadline, for the messages that say whose it was."""


def report_attempt(
    selector: InstanceSelector,
    breaker: CircuitBreaker,
    health: str,
    capability: str,
    instance: Instance,
    settings: BreakerSettings | None,
    events: OutboundEvents | None = None,
) -> None:
    """Tell an instance breaker how an attempt went ("ok", "neutral", "failed"); it opens only while
    `max_ejected_share` of the capability's live instances allows one more ejection."""
    if health == "ok":
        breaker.on_success()
    elif health == "neutral":
        breaker.on_neutral()
    else:
        share = settings.max_ejected_share if settings is not None else 0.5

        def may_open() -> bool:
            live = [instance_key(i) for i in selector.live(capability)]
            return selector.state.ejected_share_allows(capability, live, share)

        if breaker.on_failure(may_open):
            log.warning("ejected instance %s of %s (circuit breaker open)", instance_key(instance), capability)
            if events is not None:
                events.ejected(capability)


UNANSWERED_MIN_WINDOW_S = 0.1
"""An attempt that timed out says its instance did not answer only if it had at least this long: one sent with a
caller's last few milliseconds says nothing about the instance."""


def held_to_deadline(window_s: float | None, sent_at: float) -> bool:
    """Whether an attempt that ended DEADLINE_EXCEEDED was held for (nearly) its whole window of at least
    UNANSWERED_MIN_WINDOW_S, as a frozen or hung instance holds it; not an instance that answered the code at
    once (its own deadline too short to queue, say)."""
    return (window_s is not None and window_s >= UNANSWERED_MIN_WINDOW_S
            and time.monotonic() - sent_at >= 0.9 * window_s)


def report_unreachable(
    liveness: Liveness, capability: str, instance: Instance, events: OutboundEvents | None
) -> None:
    """An instance could not be reached: skip it for a growing while, count it, and say so once per
    suspicion (not once per call)."""
    seconds = liveness.mark_failed(instance_key(instance))
    if events is not None:
        events.unreachable(capability, instance.identity)
    if seconds:
        log.warning("instance %s (%s) of %s is unreachable; skipping it for %.0f s", instance.instance_id,
                    instance.identity, capability, seconds)


def report_unanswered(
    liveness: Liveness, capability: str, instance: Instance, events: OutboundEvents | None, deadline: str
) -> None:
    """An instance held an attempt until its deadline (which one, `deadline_words`): balancing avoids it
    for a growing while (a frozen or hung replica keeps its connection and its lease); counted, and said as a
    warning at most once a minute per instance (`Liveness.news`), not once per call, else at debug level: a flaky
    instance that answers its retries clears its suspicion each time and is struck again on the next call."""
    ikey = instance_key(instance)
    seconds = liveness.mark_unanswered(ikey)
    if events is not None:
        events.unanswered(capability, instance.identity)
    if seconds:
        try:
            others = any(instance_key(i) != ikey for i in liveness.live(capability))
        except HivemeshError:
            others = False
        then = (f"preferring its other instances for {seconds:.0f} s" if others
                else "no other instance is live, so calls still go to it")
    else:
        then = "already avoided"
    level = logging.WARNING if seconds and liveness.news(ikey) else logging.DEBUG
    log.log(level, "instance %s (%s) of %s did not answer within %s; %s", instance.instance_id, instance.identity,
            capability, deadline, then)


def within(call: OutboundCall, named: PolicyNamed | None) -> str:
    """The call's own deadline in a message's words: its seconds and whose (`deadline_words`)."""
    policy = named(TIMEOUTS.name, call.capability) if named is not None and call.timeout_from == POLICY else ""
    return deadline_words(call.timeout_s, call.timeout_from, policy)


def timed_out(
    err: HivemeshError, call: OutboundCall, instance: Instance, deadline: str, *, streamed: int | None = None
) -> HivemeshError:
    """err said in the mesh's words when gRPC ended a call that had left this node at its deadline
    (DEADLINE_EXCEEDED, no hivemesh reason), as `went_away` says UNAVAILABLE: the capability, the agent and instance
    that held the call, and the deadline that passed, in seconds and whose it was (deadline, `deadline_words`), so
    the caller sees which number to change; gRPC's own text follows in parentheses. `streamed`: the chunks a stream
    had delivered (None: not a stream). Type, code, reason, pushback and cause stay as they were. Any other error
    as it is."""
    if not err.said_by_grpc or err.code != grpc.StatusCode.DEADLINE_EXCEEDED:
        return err
    cap = call.capability
    agent = instance.card.name or instance.identity
    if streamed is None:
        what = f"did not answer {cap!r}"
    else:
        what = f"did not finish the stream of {cap!r} (after {streamed} chunk{'' if streamed == 1 else 's'})"
    message = f"agent {agent} (instance {instance.instance_id}) {what} within {deadline} (gRPC: {err.message})"
    worded = type(err)(message, metadata={**err.metadata, "capability": cap[:128], "agent": instance.identity,
                                          "instance": instance.instance_id},
                       field_violations=err.field_violations, retry_after_s=err.retry_after_s, code=err.code,
                       reason=err.reason)
    worded.said_by_grpc = True
    worded.__cause__ = err.__cause__ if err.__cause__ is not None else err
    return worded


MAY_HAVE_RUN = "may_have_run"
"""ErrorInfo metadata of an AGENT_UNAVAILABLE that says whether the call may have run: "true" when the agent went
away under it (`went_away`, or a sidecar whose agent's connection broke), "false" when the agent's sidecar could not
connect to its agent at all, so nothing ran and sending it again is as safe as a request that never left
(`ran_nothing`)."""


def resend_advice(capability: str, *, idempotent: bool, keyed: bool, streamed: int | None) -> str:
    """When a call that may have run is safe to send again, in a message's words: `went_away`'s, and a sidecar's
    whose own agent went away under a call (the same words whichever side saw it)."""
    if idempotent:
        return f"{capability!r} is declared idempotent, so sending it again is safe"
    if streamed is not None:
        return "a stream is never deduplicated, so sent again it could run twice"
    if keyed:
        return "it is safe to send again only with the same idempotency key, which this call carried"
    return ("it is safe to send again only with an idempotency key (idempotency_key=), and this call carried "
            "none: sent again, it could run twice")


def gone_message(agent: str, instance_id: str, capability: str, *, resend: str, streamed: int | None,
                 said: str, broke: str = "its connection broke") -> str:
    """The words of an agent gone during a call (`went_away`'s); broke names the connection that broke."""
    if streamed is None:
        during, ended = f"the call to {capability!r}", "before it answered"
    else:
        during = f"the stream from {capability!r}, after {streamed} chunk{'' if streamed == 1 else 's'}"
        ended = "before the stream ended"
    return (f"agent {agent} (instance {instance_id}) went away during {during} (its process stopped or {broke} "
            f"{ended}): the call may have run, in part or in full; {resend} (gRPC: {said})")


def ran_nothing(err: HivemeshError) -> bool:
    """Whether err is an agent's sidecar saying it could not connect to its agent (AGENT_UNAVAILABLE with
    `MAY_HAVE_RUN` "false"): the request reached no agent, so the attempt loop treats it as never sent (fail over,
    free of any budget) where a may-have-run failure is sent again only when that is safe (`may_resend`)."""
    return err.reason == AgentUnavailableError.reason and err.metadata.get(MAY_HAVE_RUN) == "false"


def went_away(
    err: HivemeshError, call: OutboundCall, instance: Instance, *, streamed: int | None = None
) -> HivemeshError:
    """err said in the mesh's words when gRPC ended a call that had left this node (UNAVAILABLE, no hivemesh reason:
    the agent process stopped or its connection broke under the call, on a unary call, a link, `call_on` or a
    stream): which agent and instance went away, that the call may have run (ErrorInfo `MAY_HAVE_RUN` "true"), and
    when sending it again is safe; gRPC's own text ("Stream removed", "Cancelling all calls") follows in
    parentheses. `streamed` is how many chunks a stream had delivered (None: not a stream); a stream carries no
    idempotency key, so only an idempotent capability's is safe to send again. Type, code, reason, pushback and cause
    stay as they were (retry policies and callers match on them). Any other error as it is: an agent's sidecar that
    saw its agent go says so itself, with a reason, and is passed on unchanged."""
    if not err.said_by_grpc or err.code != grpc.StatusCode.UNAVAILABLE:
        return err
    cap = call.capability
    resend = resend_advice(cap, idempotent=idempotent(instance, cap), keyed=bool(call.idempotency_key),
                           streamed=streamed)
    message = gone_message(instance.card.name or instance.identity, instance.instance_id, cap, resend=resend,
                           streamed=streamed, said=err.message)
    worded = type(err)(message, metadata={**err.metadata, "capability": cap[:128], "agent": instance.identity,
                                          "instance": instance.instance_id, MAY_HAVE_RUN: "true"},
                       field_violations=err.field_violations, retry_after_s=err.retry_after_s, code=err.code,
                       reason=err.reason)
    worded.said_by_grpc = True
    worded.__cause__ = err.__cause__ if err.__cause__ is not None else err
    return worded


STALE_RESENDS = 3
"""How often one call is sent again after STALE_REGISTRATION refusals, each time once the registry view moved on: a
view that keeps changing cannot hold a call for ever."""
STALE_WAIT_S = 5.0
"""How long a call refused STALE_REGISTRATION by the last instance it may use waits for the registry view to move on,
at most, and never past its deadline: a watch resuming after an etcd pause (its reconnect backoff is at most ~2.4 s)
catches up well within it. A wait that runs out is not begun again: the call fails with the refusal."""


class StaleRefusals:
    """The instances that refused one call as routed by a registration of theirs that is gone (STALE_REGISTRATION,
    mesh/layers/fence.py), and the bounded wait for the caller's registry view to move on.

    Such a refusal says nothing ran, and that the instance registered again (its lease lost, say in an etcd pause
    past its TTL) while this caller's watch still shows the old entry: sent by that entry again, the call is refused
    again; failed, it fails although its agent is alive and may serve it. So when no other instance is left, the call
    waits (woken by the watch, not polling it) until the view shows a newer registration of a refusing instance or an
    instance not tried yet, and goes again: free of any retry budget, with or without a retry policy, at most
    STALE_RESENDS times, each wait at most STALE_WAIT_S and never past the deadline.

    A keyed call to a non-idempotent capability is not moved to another instance by such a refusal, neither at once nor
    after the wait, not even when the membership changes meanwhile (a new call with the key follows the new
    membership, as every caller's does): it waits for the refusing one (its key's, `Attempts._affinity`) and, if the
    view does not move on,
    fails with the refusal, saying it ran nowhere and may be sent again with the same key
    (`Attempts._ended_by_refusal`). The refusal proves only that this send ran nothing. An earlier send of the same key
    (a workflow resumed after its orchestrator died, a caller that lost an answer, a duplicate still in flight) may have
    run, or still run, on the refusing instance, and only that agent process remembers the key (`sdk/idempotency.py`:
    its memory is per process), so another instance would run the effect a second time: with two real agents, moved, it
    did, both after the earlier send finished and while it ran (tests/integration/test_stale_registration_retry.py).

    A caller whose watch is current has usually applied the lost lease's DELETE of the refusing entry before the new
    registration's PUT (~100 ms later): while a refusal is pending, no live instance is not yet a failure, and a keyed
    call that selection now leads elsewhere (the key's instance gone from the view for that while) waits as well, and
    only for a refusing instance's newer registration (`elsewhere`, `view_moved(keyed=True)`).
    """

    __slots__ = ("_by", "_waited_out", "resends")

    def __init__(self) -> None:
        self._by: dict[str, int] = {}
        """instance_key -> the registration revision it refused the call as routed by."""
        self._waited_out = False
        self.resends = 0
        """Times the view moved on and the call was sent again."""

    def note(self, instance: Instance) -> None:
        """instance refused the call as routed by its registration in the view (`registration_revision`)."""
        self._by[instance_key(instance)] = instance.registration_revision

    def blocks(self, instance: Instance) -> bool:
        """Whether the view still shows instance as the registration that refused the call: sending by it again
        would be refused again (a keyed call's affinity, or a reuse of tried instances, chooses it anyway)."""
        by = self._by
        return bool(by) and by.get(instance_key(instance), -1) == instance.registration_revision

    @property
    def pending(self) -> bool:
        """Whether an instance refused the call so and the view has not shown its newer registration yet."""
        return bool(self._by)

    def elsewhere(self, instance: Instance) -> bool:
        """Whether instance is none of those that refused the call while some did: a keyed call must not go there
        (only its key's instance remembers the key), it waits for the refusing one to show again."""
        by = self._by
        return bool(by) and instance_key(instance) not in by

    def forget(self) -> None:
        """After a retry's backoff the same registration may be tried again: an instance that only stood still past
        its lease's TTL refuses calls until etcd answers its keepalive, and may then hold the same registration."""
        self._by.clear()

    async def view_moved(
        self, selector: InstanceSelector, call: OutboundCall, tried: set[str], *, keyed: bool = False
    ) -> bool:
        """Wait, bounded, for the view to show a newer registration of an instance that refused the call, or (not
        keyed) an instance neither tried nor there before; True (those refusing instances untried again) once it
        does. A keyed call waits for a refusing instance only: another one appearing, or the only one left once the
        refusing entry is deleted, is no reason to choose again. False at once when no instance refused the call so,
        its re-sends are spent, an earlier wait ran out or no time is left; False when this wait runs out."""
        by = self._by
        if not by or self.resends >= STALE_RESENDS or self._waited_out:
            return False
        remaining = call.remaining()
        wait_s = STALE_WAIT_S if remaining is None else min(STALE_WAIT_S, remaining)
        if wait_s <= 0:
            return False

        def view() -> dict[str, int]:
            try:
                return {instance_key(i): i.registration_revision for i in selector.live_for(call)}
            except HivemeshError:
                return {}  # no live instance now (a lost lease's entry goes before the new one comes): not yet

        before = view()

        def moved() -> bool:
            return any(by.get(k, rev) != rev or (not keyed and k not in tried and before.get(k) != rev)
                       for k, rev in view().items())

        if not await selector.liveness.wait_until(moved, wait_s):
            self._waited_out = True
            return False
        now = view()
        for k in [k for k, rev in by.items() if now.get(k, rev) != rev]:
            tried.discard(k)
            del by[k]
        self.resends += 1
        return True


class Attempts:
    """The attempts of one unary call to one capability; `run` once. `retries` counts the retries spent."""

    __slots__ = ("_budget", "_last", "_last_instance", "_may_have_run", "_policies", "_refused", "_reuse", "_stale",
                 "_token_resent", "_tried", "attempt", "call", "parts", "retries")

    def __init__(self, parts: AttemptParts, call: OutboundCall, policies: OutboundPolicies) -> None:
        self.parts = parts
        self.call = call
        self._policies = policies
        self.attempt = 1
        """Attempts that may have reached an agent (a failover of a never-sent request is not one)."""
        self.retries = 0
        self._budget: RetryBudget | None = None
        self._tried: set[str] = set()
        self._refused: set[str] = set()
        self._stale = StaleRefusals()
        self._reuse = False
        self._token_resent = False
        self._last: HivemeshError | None = None
        self._last_instance: Instance | None = None
        self._may_have_run: HivemeshError | None = None
        """The first error of an attempt that may have reached the agent's handler: not one never sent, nor one refused
        before the agent saw it (a token refusal, STALE_REGISTRATION)."""

    async def run(self) -> Result:
        """The answer and the instance that gave it, guarded by the capability breaker (if a breakers policy
        gives the capability one); the final error otherwise.

        A call pinned to an agent (`call.agent`) is outside the capability breaker, neither refused nor counted
        (`invoke_stream` likewise). That breaker stands for the capability as every caller on the node gets it,
        with failover across all agents; a pinned call's outcome is one agent's, or the pin's own
        NO_LIVE_INSTANCE with nothing sent. Counted, a pin to a down or mistyped agent opened the capability for
        everyone; obeyed, an outage elsewhere would refuse a healthy agent's callers. Its guard is its agent's
        instance breakers, which its attempts feed as any call's do (`InstanceSelector.choose` fails it
        CIRCUIT_OPEN naming the agent once all are ejected): a (capability, agent) breaker would repeat them.
        """
        cap = self.call.capability
        settings = self._policies.breakers
        breaker: CircuitBreaker | None = None
        if settings is not None and settings.capability is not None and not self.call.agent:
            breaker = self.parts.selector.state.capability_breaker(cap, settings.capability)
            if not breaker.allow():
                raise CircuitOpenError(
                    f"the circuit breaker of {cap!r} is open after repeated failures",
                    metadata={"capability": cap[:128]},
                )
        outcome = "neutral"
        try:
            result = await self._loop()
            outcome = "success"
            return result
        except HivemeshError as err:
            codes = settings.failure_codes if settings is not None else DEFAULT_FAILURE_CODES
            if err.code in codes:
                outcome = "failure"
            raise
        finally:
            if breaker is not None:
                if outcome == "success":
                    breaker.on_success()
                elif outcome == "failure":
                    if breaker.on_failure():
                        log.warning("circuit breaker of capability %s opened", cap)
                else:
                    breaker.on_neutral()

    def _affinity(self) -> str | None:
        """The idempotency key of a call to a non-idempotent capability (None otherwise), as the instances the call
        may use declare it (a pinned call's: its agent's)."""
        call = self.call
        if idempotent(self.parts.selector.live_for(call)[0], call.capability):
            return None
        return call.idempotency_key or None

    async def _loop(self) -> Result:
        parts, call = self.parts, self.call
        selector = parts.selector
        state, liveness = selector.state, selector.liveness
        cap = call.capability
        routes, settings, policy = self._policies.routes, self._policies.breakers, self._policies.retries
        if policy is not None:
            self._budget = state.budget(cap, policy)
            self._budget.record_call()
        failure_codes = settings.failure_codes if settings is not None else DEFAULT_FAILURE_CODES
        tried, refused = self._tried, self._refused
        affinity = self._affinity()
        stale, keyed = self._stale, affinity is not None
        while True:
            remaining = call.remaining()
            if remaining is not None and remaining <= 0:
                last = self._last
                raise DeadlineExceededError(
                    f"deadline passed before {cap!r} could be sent ({within(call, parts.policy_named)}"
                    + (f"; after {self.attempt - 1 + len(tried)} failed attempt(s): {last.message})" if last else ")"),
                    metadata={"capability": cap[:128]},
                )
            instance: Instance | None = None
            try:
                instance = selector.choose(call, routes, tried, reuse=self._reuse, affinity=affinity, refused=refused)
                gone = False
            except NoLiveInstanceError:
                if not stale.pending:
                    raise
                gone = True  # the refusing entry deleted, its new registration not shown yet: wait for it
            if gone or (keyed and instance is not None and stale.elsewhere(instance)):
                # A refusal is pending and the view has no instance (a lost lease's DELETE comes before the new
                # registration's PUT), or leads a keyed call away from the refusing instance, which alone remembers
                # its key: wait for the newer registration; fail with the refusal if it does not come.
                if await stale.view_moved(selector, call, tried, keyed=keyed):
                    log.info("the registry view of %s showed a newer registration after a refusal as routed by an old "
                             "one: sending the call again", cap)
                    continue
                assert self._last is not None
                raise self._ended_by_refusal(self._last, keyed=keyed)
            if instance is None or stale.blocks(instance):
                # Refused as routed by a registration that is gone, and no other instance left: once the view shows
                # the newer registration (or another instance), go again, free of any budget.
                if await stale.view_moved(selector, call, tried, keyed=keyed):
                    log.info("the registry view of %s moved on after a refusal as routed by an old registration: "
                             "sending the call again", cap)
                    continue
                # Every allowed instance was unreachable (or refused the call by the registration the view still
                # shows): a retry with backoff, if the policy has one to spend.
                last, last_instance = self._last, self._last_instance
                assert last is not None and last_instance is not None
                if not self._may_retry(last, last_instance, never_sent=True):
                    raise self._ended_by_refusal(last, keyed=keyed)
                await self._back_off(last)
                tried.clear()
                continue
            per_try, per_try_bound = remaining, False
            try_limit = policy.per_try_timeout_s if policy is not None else None
            if try_limit is not None and (per_try is None or try_limit < per_try):
                per_try, per_try_bound = try_limit, True
            md = await parts.prepare(call, instance)
            ikey = instance_key(instance)
            breaker: CircuitBreaker | None = None
            if settings is not None and settings.instance is not None:
                breaker = state.instance_breaker(cap, ikey, settings.instance)
                if not breaker.allow():
                    refused.add(ikey)  # open, or its half-open probe slots are taken
                    continue
            health = "neutral"
            span = None if tracing.TRACER is None else tracing.start(
                f"attempt {cap}", tracing.SpanKind.INTERNAL, tracing.rpc_attributes(
                    tracing.AGENT_SERVICE, "Invoke", capability=cap, agent=instance.identity,
                    instance=instance.instance_id, retry_attempt=self.attempt,
                    breaker_state=breaker.state.value if breaker is not None else None))
            failure: HivemeshError | None = None
            state.attempt_started(cap, ikey)
            sent_at = time.monotonic()
            try:
                raw = await parts.send(call, instance, md, per_try)
                health = "ok"
            except AttemptError as failed:
                err = failed.error
                never_sent = failed.never_sent or ran_nothing(err)  # its sidecar could not reach the agent
                if not never_sent:
                    err = went_away(err, call, instance)
                    if err.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        err = timed_out(err, call, instance, self._deadline(per_try_bound))
                failure = err
                if never_sent or (err.code in failure_codes and err.reason != StaleRegistrationError.reason):
                    health = "failed"
            finally:
                if span is not None:
                    tracing.finish(span, failure, None if failure is not None else grpc.StatusCode.OK)
                state.attempt_finished(cap, ikey, failed=health == "failed")
                if breaker is not None:
                    report_attempt(selector, breaker, health, cap, instance, settings, self.parts.events)
            if health == "ok":
                liveness.mark_ok(ikey)
                return raw, instance
            if isinstance(err, TokenExpiredError):
                parts.forget_token(instance)
            if err.reason in TOKEN_REFUSALS and not self._token_resent:
                # The target refused the token before its agent saw the call: it expired, or this node's
                # certificate (or the signing key) was just rotated. Send once more with a fresh token.
                parts.forget_token(instance)
                self._token_resent = True
                self._last, self._last_instance = err, instance
                continue
            tried.add(ikey)
            self._last, self._last_instance = err, instance
            if never_sent:
                report_unreachable(liveness, cap, instance, parts.events)
                continue  # the request never left: another instance may take it, free of any budget
            if err.reason == StaleRegistrationError.reason:
                # Routed by a registration of the instance that is gone (mesh/layers/fence.py): it ran nothing, so
                # another instance may take it, free of any budget (not a keyed call's: its affinity keeps to this
                # one, see StaleRefusals); this one again once the registry shows its new registration.
                self._stale.note(instance)
                log.info("instance %s of %s refused a call routed by its old registration: %s", instance.instance_id,
                         cap, err.message)
                continue
            if self._may_have_run is None:
                self._may_have_run = err
            if err.code == grpc.StatusCode.DEADLINE_EXCEEDED and held_to_deadline(per_try, sent_at):
                report_unanswered(liveness, cap, instance, parts.events, self._deadline(per_try_bound))
            if policy is None:
                # No retry policy: an idempotent capability still fails over when a connection broke mid-call.
                if err.code == grpc.StatusCode.UNAVAILABLE and idempotent(instance, cap):
                    liveness.mark_failed(ikey)
                    continue
                raise err
            timed_out_try = per_try_bound and err.code == grpc.StatusCode.DEADLINE_EXCEEDED
            if not self._may_retry(err, instance, per_try_timed_out=timed_out_try):
                raise err
            await self._back_off(err)
            self._reuse = True

    def _deadline(self, per_try_bound: bool) -> str:
        """The deadline an attempt had, in a message's words: the retries policy's per-try timeout when it bound the
        attempt, else the call's own."""
        named, policy = self.parts.policy_named, self._policies.retries
        if per_try_bound and policy is not None:
            name = named(RETRIES.name, self.call.capability) if named is not None else ""
            return deadline_words(policy.per_try_timeout_s, PER_TRY, name)
        return within(self.call, named)

    def _ended_by_refusal(self, err: HivemeshError, *, keyed: bool) -> HivemeshError:
        """The error the call fails with when its attempts ran out on err: a STALE_REGISTRATION refusal also says
        whether the call may be sent again (it ran on no instance unless an earlier attempt may have reached one),
        and, for a keyed call, that it must go with the same key and why it did not go to another instance: the
        caller decides whether to send it again, and the refusal alone cannot tell it. Any other error as it is."""
        if err.reason != StaleRegistrationError.reason:
            return err
        ran = self._may_have_run
        if ran is not None:
            note = (f"; this send ran nothing, but an earlier attempt of the call failed {ran.reason} and may have run"
                    + (": send it again only with the same idempotency key" if keyed else ""))
        elif keyed:
            note = ("; the call ran on no instance and may be sent again, with the same idempotency key (it was not "
                    "sent to another instance: only the one its key leads to remembers what earlier sends of that key "
                    "did)")
        else:
            note = "; the call ran on no instance and may be sent again"
        return StaleRegistrationError(err.message + note, metadata=err.metadata, retry_after_s=err.retry_after_s)

    def _may_retry(
        self,
        err: HivemeshError,
        instance: Instance,
        *,
        never_sent: bool = False,
        per_try_timed_out: bool = False,
    ) -> bool:
        policy, budget, call = self._policies.retries, self._budget, self.call
        if policy is None or budget is None:
            return False
        if self.attempt >= policy.attempts or not policy.is_retryable(err.code, per_try_timed_out=per_try_timed_out):
            return False
        if not never_sent and not may_resend(
            idempotent=idempotent(instance, call.capability), idempotency_key=bool(call.idempotency_key)
        ):
            return False
        delay = max(policy.backoff.delay(self.attempt), err.retry_after_s or 0.0)
        remaining = call.remaining()
        if remaining is not None and delay >= remaining:
            return False  # no time left for another attempt: fail now with the real error
        if not budget.try_spend():
            log.debug("retry budget of %s exhausted; not retrying %s", call.capability, err.reason)
            if self.parts.events is not None:
                self.parts.events.budget_refused(call.capability)
            return False
        return True

    async def _back_off(self, err: HivemeshError) -> None:
        """Wait the backoff of this attempt (or the server's pushback, if longer), then count the retry."""
        policy = self._policies.retries
        assert policy is not None
        self.retries += 1
        self._stale.forget()
        delay = max(policy.backoff.delay(self.attempt), err.retry_after_s or 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        self.attempt += 1
