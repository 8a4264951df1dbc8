"""Outbound parts alone: instance selection (round robin, failure suspicion), and the token source's cache."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from hivemesh.mesh.errors import (
    ControlPlaneUnavailableError,
    GrantDeniedError,
    NoLiveInstanceError,
    UnknownCapabilityError,
)
from hivemesh.mesh.outbound.call import OutboundCall
from hivemesh.mesh.outbound.selection import InstanceSelector, Liveness
from hivemesh.mesh.resilience.traffic import TrafficState
from hivemesh.mesh.token_source import TokenSource
from hivemesh.v1 import agent_pb2, control_pb2, mesh_pb2


class _Instances:
    def __init__(self, table: dict[str, list[str]], known: set[str] | None = None) -> None:
        self.table = table
        self.known = known or set(table)

    def instances(self, capability: str) -> Sequence[mesh_pb2.AgentInstance]:
        card = agent_pb2.AgentCard(name="w")
        return [mesh_pb2.AgentInstance(instance_id=i, card=card) for i in self.table.get(capability, [])]

    def knows_capability(self, capability: str) -> bool:
        return capability in self.known


def _selector(source: _Instances, clock: Callable[[], float] | None = None) -> InstanceSelector:
    liveness = Liveness(source, clock=clock) if clock is not None else Liveness(source)
    return InstanceSelector(liveness, TrafficState())


def _pick(selector: InstanceSelector, capability: str, tried: set[str] | None = None) -> str | None:
    """The instance id chosen; tried holds instance ids of agent "w"."""
    keys = {f"w/{i}" for i in tried or ()}
    chosen = selector.choose(OutboundCall(capability, b"", (), None, None), None, keys, reuse=False)
    return None if chosen is None else chosen.instance_id


def test_round_robin_spreads_calls_evenly() -> None:
    selector = _selector(_Instances({"x": ["a", "b", "c"]}))
    assert [_pick(selector, "x") for _ in range(9)] == ["a", "b", "c"] * 3


def test_unknown_and_unserved_capabilities_are_told_apart() -> None:
    selector = _selector(_Instances({"x": []}, known={"x"}))
    with pytest.raises(NoLiveInstanceError):
        _pick(selector, "x")
    with pytest.raises(UnknownCapabilityError):
        _pick(selector, "y")


def test_a_failed_instance_is_tried_last_until_its_suspicion_ends() -> None:
    now = [100.0]
    selector = _selector(_Instances({"x": ["a", "b"]}), clock=lambda: now[0])
    selector.liveness.mark_failed("w/a")
    assert selector.liveness.is_suspect("w/a") and not selector.liveness.is_suspect("w/b")
    assert [_pick(selector, "x") for _ in range(4)] == ["b", "b", "b", "b"]
    assert _pick(selector, "x", tried={"b"}) == "a"  # still a fallback
    assert _pick(selector, "x", tried={"a", "b"}) is None  # every instance tried: none left
    now[0] += 5
    assert {_pick(selector, "x") for _ in range(4)} == {"a", "b"}
    selector.liveness.mark_failed("w/b")
    selector.liveness.mark_ok("w/b")  # reached again: no longer avoided
    assert not selector.liveness.is_suspect("w/b")


class _Issuer:
    def __init__(self, scopes: list[str], ttl: float = 300, fail: bool = False) -> None:
        self.calls = 0
        self.scopes = scopes
        self.ttl = ttl
        self.fail = fail
        self.now = 1000.0

    async def issue_token(
        self, audience: str, scopes: Sequence[str] = (), ttl_s: int = 0
    ) -> control_pb2.IssueTokenResponse:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail:
            raise ControlPlaneUnavailableError()
        return control_pb2.IssueTokenResponse(
            token=f"t{self.calls}", expires_at_unix=int(self.now + self.ttl), scopes=self.scopes
        )


async def test_tokens_are_fetched_once_and_shared_by_concurrent_callers() -> None:
    issuer = _Issuer(["echo"])
    source = TokenSource(issuer, clock=lambda: issuer.now)
    tokens = await asyncio.gather(*(source.get("aud", "echo") for _ in range(20)))
    assert set(tokens) == {"t1"} and issuer.calls == 1


async def test_tokens_refresh_in_the_background_before_expiry() -> None:
    issuer = _Issuer(["echo"], ttl=100)
    source = TokenSource(issuer, clock=lambda: issuer.now)
    assert await source.get("aud", "echo") == "t1"
    issuer.now += 80  # past 75% of the lifetime: still valid, refreshed behind the caller's back
    assert await source.get("aud", "echo") == "t1"
    seen = "t1"
    for _ in range(100):  # bounded: the refresh needs a few loop turns
        seen = await source.get("aud", "echo")
        if seen == "t2":
            break
        await asyncio.sleep(0)
    assert seen == "t2" and issuer.calls == 2
    await source.close()


async def test_a_capability_outside_the_grant_is_refused_locally() -> None:
    issuer = _Issuer(["echo"])
    source = TokenSource(issuer, clock=lambda: issuer.now)
    with pytest.raises(GrantDeniedError, match="not granted capability 'admin'"):
        await source.get("aud", "admin")


async def test_cached_token_outlives_a_control_plane_outage_until_it_expires() -> None:
    issuer = _Issuer(["echo"], ttl=100)
    source = TokenSource(issuer, clock=lambda: issuer.now)
    await source.get("aud", "echo")
    issuer.fail = True
    issuer.now += 90
    assert await source.get("aud", "echo") == "t1"
    issuer.now += 20
    with pytest.raises(ControlPlaneUnavailableError):
        await source.get("aud", "echo")
    await source.close()


class _Unlisting(_Issuer):
    """A control plane whose grant allows every capability by pattern: while it sees no registered instance of the
    audience it refuses "every capability" (ask_by_name) and grants what is asked by name."""

    def __init__(self, offered: list[str]) -> None:
        super().__init__(offered, ttl=100)
        self.registered = False
        self.asked: list[tuple[str, ...]] = []

    async def issue_token(
        self, audience: str, scopes: Sequence[str] = (), ttl_s: int = 0
    ) -> control_pb2.IssueTokenResponse:
        self.asked.append(tuple(scopes))
        if not scopes and not self.registered:
            self.calls += 1
            raise GrantDeniedError("nothing that can be listed", metadata={"ask_by_name": "true"})
        resp = await super().issue_token(audience, scopes, ttl_s)
        if scopes:
            del resp.scopes[:]
            resp.scopes.extend(scopes)
        return resp


async def test_an_audience_the_control_plane_cannot_list_gets_tokens_by_name_until_it_can() -> None:
    issuer = _Unlisting(["echo", "shout"])
    source = TokenSource(issuer, clock=lambda: issuer.now)
    echo = await source.get("aud", "echo")
    assert issuer.asked == [(), ("echo",)]
    shout = await source.get("aud", "shout")
    assert issuer.asked[2:] == [(), ("shout",)]
    # Each capability keeps its own token: they do not push each other out.
    assert await source.get("aud", "echo") == echo and await source.get("aud", "shout") == shout
    assert len(issuer.asked) == 4
    # Past a by-name token's refresh time "every capability" is asked again, and once listed it serves all.
    issuer.registered = True
    issuer.now += 80
    every = await source.get("aud", "echo")
    assert issuer.asked[4:] == [()] and every not in (echo, shout)
    assert await source.get("aud", "shout") == every
    await source.close()


async def test_a_refusal_without_ask_by_name_is_not_asked_again_by_name() -> None:
    class _Denying(_Issuer):
        async def issue_token(
            self, audience: str, scopes: Sequence[str] = (), ttl_s: int = 0
        ) -> control_pb2.IssueTokenResponse:
            self.calls += 1
            raise GrantDeniedError("no grant allows it")

    issuer = _Denying([])
    source = TokenSource(issuer, clock=lambda: issuer.now)
    with pytest.raises(GrantDeniedError, match="no grant allows it"):
        await source.get("aud", "echo")
    assert issuer.calls == 1


async def test_invalidate_and_clear_drop_tokens_asked_by_name() -> None:
    issuer = _Unlisting(["echo"])
    source = TokenSource(issuer, clock=lambda: issuer.now)
    first = await source.get("aud", "echo")
    source.invalidate("aud")
    second = await source.get("aud", "echo")
    source.clear()
    third = await source.get("aud", "echo")
    assert len({first, second, third}) == 3 and issuer.asked == [(), ("echo",)] * 3
    await source.close()


def test_suspicion_doubles_on_each_refusal_after_it_ran_out_up_to_a_cap_and_a_success_resets_it() -> None:
    now = [100.0]
    liveness = Liveness(_Instances({"x": ["a"]}), clock=lambda: now[0])
    spans = []
    for _ in range(7):
        spans.append(liveness.mark_failed("a"))
        assert liveness.mark_failed("a") == 0.0  # a call sent before the refusal: no extra strike
        now[0] += spans[-1] - 0.01
        assert liveness.is_suspect("a")
        now[0] += 0.02
        assert not liveness.is_suspect("a")
    assert spans == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    liveness.mark_ok("a")
    assert liveness.mark_failed("a") == 2.0


def test_an_unanswered_call_is_its_own_suspicion_doubling_alike_and_a_success_ends_both() -> None:
    now = [100.0]
    liveness = Liveness(_Instances({"x": ["a"]}), clock=lambda: now[0])
    assert liveness.mark_unanswered("a") == 2.0 and liveness.mark_unanswered("a") == 0.0
    assert liveness.is_unanswering("a") and not liveness.is_suspect("a")  # reachable, only not answering
    now[0] += 2.01
    assert not liveness.is_unanswering("a")
    assert liveness.mark_unanswered("a") == 4.0  # again after it ran out: twice as long
    assert liveness.mark_failed("a") == 2.0  # the other suspicion keeps its own count
    liveness.mark_ok("a")
    assert not liveness.is_unanswering("a") and not liveness.is_suspect("a")
    assert liveness.mark_unanswered("a") == 2.0


def test_status_says_why_an_instance_is_avoided_a_refused_connection_first() -> None:
    now = [100.0]
    liveness = Liveness(_Instances({"x": ["a", "b"]}), clock=lambda: now[0])
    assert liveness.avoided("a") == ""
    liveness.mark_unanswered("a")
    assert liveness.avoided("a") == "unanswering" and liveness.avoided("b") == ""
    liveness.mark_failed("a")
    assert liveness.avoided("a") == "unreachable"
    now[0] += 2.01
    assert liveness.avoided("a") == ""
