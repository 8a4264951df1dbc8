"""The loop guard's decision alone (the integration test drives it over the real mesh): what counts as a
revisit and as depth, from the call's `CallContext.chain` and from a verified delegation chain."""

from __future__ import annotations

import pytest

from hivemesh.mesh.errors import DepthExceededError, LoopDetectedError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.layers.loopguard import LoopGuardLayer
from hivemesh.mesh.tokens import TokenClaims
from hivemesh.sdk import AgentServerConfig
from hivemesh.v1 import agent_pb2

TD = "spiffe://hivemesh.local"
ME, B, C, USER = f"{TD}/agent/me", f"{TD}/agent/b", f"{TD}/agent/c", f"{TD}/client/user"
CAPS = [agent_pb2.Capability(name="plain"), agent_pb2.Capability(name="split", recursion=2)]


def _call(capability: str, chain: tuple[str, ...] = (), delegation: tuple[str, ...] = ()) -> Inbound:
    req = agent_pb2.InvokeRequest(capability=capability, context=agent_pb2.CallContext(chain=chain))
    claims = TokenClaims(subject=USER, audience=ME, scopes=frozenset({capability}), jti="j", expires_at=0,
                         issuer="cp", cnf_thumbprint=None, raw={}, delegation=delegation) if delegation else None
    return Inbound(method="Invoke", request=req, wire_size=0, metadata={}, auth_context={}, claims=claims)


def test_first_calls_and_chains_without_this_agent_pass() -> None:
    guard = LoopGuardLayer(CAPS, me=ME, max_depth=4)
    for call in (_call("plain"), _call("plain", (B, C)), _call("plain", delegation=(USER, B, C)),
                 _call("split", (ME, B, ME))):
        guard.check(call)
    guard.check(Inbound(method="Describe", request=None, wire_size=0, metadata={}, auth_context={}))


@pytest.mark.parametrize(
    "call",
    [_call("plain", (B, ME, C)), _call("plain", delegation=(USER, ME, B)), _call("split", (ME, B, ME))],
    ids=["context-chain", "delegation-chain", "recursion-used-up"],
)
def test_a_revisit_past_the_declared_recursion_is_a_loop(call: Inbound) -> None:
    guard = LoopGuardLayer(CAPS, me=ME, max_depth=8)
    if call.request is not None and call.request.capability == "split":
        call.request.context.chain.append(ME)  # a third visit where 2 are declared
    with pytest.raises(LoopDetectedError, match=r"re-enter spiffe://hivemesh\.local/agent/me"):
        guard.check(call)


def test_depth_counts_the_agents_before_this_one_from_either_chain() -> None:
    guard = LoopGuardLayer(CAPS, me=ME, max_depth=3)
    guard.check(_call("plain", (B, C)))  # this agent is the third
    with pytest.raises(DepthExceededError) as deep:
        guard.check(_call("plain", (B, C, f"{TD}/agent/d")))
    assert deep.value.metadata == {"depth": "4", "max_depth": "3"}
    with pytest.raises(DepthExceededError):  # a client principal is not an agent hop; its three actors are
        guard.check(_call("plain", delegation=(USER, B, C, f"{TD}/agent/d")))
    with pytest.raises(ValueError, match="at least 1"):
        LoopGuardLayer(CAPS, me=ME, max_depth=0)


def test_the_maximum_depth_is_configured_per_agent_and_checked() -> None:
    assert AgentServerConfig(max_call_depth=3).max_call_depth == 3
    with pytest.raises(ValueError, match=r"max_call_depth must be a whole number in 1\.\.1000"):
        AgentServerConfig(max_call_depth=0)
