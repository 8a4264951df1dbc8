"""Each inbound layer alone, and the chain's order (recording layers, as gRPC's interceptor tests do)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hivemesh.mesh.errors import (
    InvalidInputError,
    PayloadTooLargeError,
    PeerUnauthenticatedError,
    TokenMissingError,
    UnknownCapabilityError,
)
from hivemesh.mesh.inbound import InboundChain
from hivemesh.mesh.layers import Inbound, InputGuardLayer, PeerIdentityLayer
from hivemesh.v1 import agent_pb2

SCHEMA = json.dumps(
    {"type": "object", "properties": {"text": {"type": "string"}, "n": {"type": "integer"}}, "required": ["text"]}
)


def _call(capability: str = "echo", payload: bytes = b'{"text": "x"}', **kw: Any) -> Inbound:
    req = agent_pb2.InvokeRequest(capability=capability, input=payload, content_type=kw.pop("content_type", ""))
    return Inbound(method="Invoke", request=req, wire_size=req.ByteSize(), metadata={}, auth_context=kw.pop("auth", {}))


@pytest.fixture
def guard() -> InputGuardLayer:
    return InputGuardLayer([agent_pb2.Capability(name="echo", input_schema=SCHEMA)], max_input_bytes=64, agent_name="a")


def test_guard_accepts_valid_input_and_hands_on_decoded_json(guard: InputGuardLayer) -> None:
    call = _call()
    guard.check(call)
    assert call.parsed_input == {"text": "x"}


def test_guard_refuses_unknown_capability(guard: InputGuardLayer) -> None:
    with pytest.raises(UnknownCapabilityError):
        guard.check(_call("nope"))


def test_guard_refuses_oversized_input(guard: InputGuardLayer) -> None:
    with pytest.raises(PayloadTooLargeError) as exc:
        guard.check(_call(payload=b'{"text": "' + b"x" * 100 + b'"}'))
    assert exc.value.metadata["limit_bytes"] == "64"


@pytest.mark.parametrize("payload", [b"{", b"\xff\xfe", b'{"text": 1'])
def test_guard_refuses_malformed_json(guard: InputGuardLayer, payload: bytes) -> None:
    with pytest.raises(InvalidInputError) as exc:
        guard.check(_call(payload=payload))
    assert "input" in exc.value.field_violations


def test_guard_names_the_field_that_breaks_the_schema(guard: InputGuardLayer) -> None:
    with pytest.raises(InvalidInputError) as exc:
        guard.check(_call(payload=b'{"text": "x", "n": "seven"}'))
    assert list(exc.value.field_violations) == ["input.n"]


def test_guard_refuses_unsupported_content_type(guard: InputGuardLayer) -> None:
    with pytest.raises(InvalidInputError) as exc:
        guard.check(_call(content_type="text/plain"))
    assert "content_type" in exc.value.field_violations


def test_guard_rejects_an_uncompilable_schema_at_build_time() -> None:
    with pytest.raises(ValueError, match="capability x input: invalid 2020-12 JSON schema"):
        InputGuardLayer([agent_pb2.Capability(name="x", input_schema='{"type": 12}')])


def test_identity_refuses_a_call_without_client_certificate() -> None:
    with pytest.raises(PeerUnauthenticatedError):
        PeerIdentityLayer("hivemesh.local").check(_call(auth={}))


def test_token_layer_needs_a_bearer_token() -> None:
    from hivemesh.mesh.layers import TokenLayer
    from hivemesh.mesh.pki import Peer, parse_spiffe_id
    from hivemesh.mesh.tokens import KeySet, TokenVerifier

    layer = TokenLayer(TokenVerifier(KeySet(), issuer="spiffe://hivemesh.local/controlplane",
                                     audience="spiffe://hivemesh.local/agent/a"))
    call = _call()
    call.peer = Peer(spiffe_id=parse_spiffe_id("spiffe://hivemesh.local/client/c"), thumbprint="t", cert_pem=b"")
    with pytest.raises(TokenMissingError):
        layer.check(call)


class _Recorder:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self._log, self._fail = name, log, fail

    def check(self, call: Inbound) -> None:
        self._log.append(self.name)
        if self._fail:
            raise InvalidInputError(f"{self.name} refused")


def test_chain_runs_layers_in_order_and_stops_at_the_first_refusal() -> None:
    log: list[str] = []
    chain = InboundChain([_Recorder("a", log), _Recorder("b", log, fail=True), _Recorder("c", log)])
    with pytest.raises(InvalidInputError, match="b refused"):
        chain.admit(_call())
    assert log == ["a", "b"]


def test_build_inbound_chain_order() -> None:
    from hivemesh.mesh.inbound import build_inbound_chain
    from hivemesh.mesh.tokens import KeySet, TokenVerifier

    chain = build_inbound_chain(
        trust_domain="hivemesh.local",
        verifier=TokenVerifier(KeySet(), issuer="i", audience="a"),
        capabilities=[agent_pb2.Capability(name="echo")],
        agent_name="a",
    )
    assert [layer.name for layer in chain.layers] == ["identity", "token", "authz", "loop-guard", "input-guard"]


def test_build_inbound_chain_puts_the_budget_before_the_input_guard_and_settles_only_with_it() -> None:
    from hivemesh.mesh.budget import BudgetTable, TokenBudgets
    from hivemesh.mesh.inbound import build_inbound_chain
    from hivemesh.mesh.tokens import KeySet, TokenVerifier

    kw: dict[str, Any] = {"trust_domain": "hivemesh.local", "agent_name": "a",
                          "verifier": TokenVerifier(KeySet(), issuer="i", audience="a"),
                          "capabilities": [agent_pb2.Capability(name="echo")]}
    chain = build_inbound_chain(**kw, budgets=TokenBudgets(BudgetTable()))
    assert [layer.name for layer in chain.layers] == [
        "identity", "token", "authz", "loop-guard", "budget", "input-guard"]
    assert chain.settles
    assert not build_inbound_chain(**kw).settles  # no layer settles: the interceptor keeps no response


def _claimed(call: Inbound, presenter: str) -> Inbound:
    from hivemesh.mesh.tokens import TokenClaims

    call.claims = TokenClaims(subject=presenter, audience="a", scopes=frozenset({"echo"}), jti="j", expires_at=0.0,
                              issuer="i", cnf_thumbprint=None, raw={})
    return call


def test_budget_layer_refuses_a_spent_caller_and_charges_the_usage_an_answer_reports() -> None:
    from hivemesh.mesh.budget import BudgetTable, TokenBudgets
    from hivemesh.mesh.errors import TokenBudgetExceededError
    from hivemesh.mesh.layers import BudgetLayer

    table = BudgetTable.from_specs({"b": {"rules": [{"subjects": ["spiffe://td/client/a"], "capabilities": ["echo"],
                                                      "max_tokens": 10}]}})
    layer = BudgetLayer(TokenBudgets(table))
    with pytest.raises(PeerUnauthenticatedError):  # ordering guard: the token layer must have run
        layer.check(_call())
    unbudgeted = _claimed(_call(), "spiffe://td/client/other")
    layer.check(unbudgeted)
    assert not unbudgeted.charge_usage  # no rule applies: nothing to charge after

    first = _claimed(_call(), "spiffe://td/client/a")
    layer.check(first)
    assert first.charge_usage
    usage = agent_pb2.Usage(input_tokens=3, output_tokens=2)
    layer.settle(first, agent_pb2.InvokeResponse(usage=usage))  # the SDK's answer: a message
    layer.settle(first, agent_pb2.InvokeResponse(usage=usage).SerializeToString())  # a forwarder's: bytes
    assert layer.budgets.spent("spiffe://td/client/a", "echo") == {"b[0]": 10}
    layer.settle(first, b"\xff not a message")  # unreadable: charges nothing, never raises
    with pytest.raises(TokenBudgetExceededError):
        layer.check(_claimed(_call(), "spiffe://td/client/a"))

    fresh = BudgetLayer(TokenBudgets(table))
    streamed = _claimed(_call(), "spiffe://td/client/a")
    streamed.method = "InvokeStream"
    fresh.check(streamed)
    fresh.settle(streamed, agent_pb2.InvokeChunk(data=b'"x"').SerializeToString())  # a data chunk: no usage
    fresh.settle(streamed, agent_pb2.InvokeChunk(final=True, usage=usage).SerializeToString())  # the final one
    assert fresh.budgets.spent("spiffe://td/client/a", "echo") == {"b[0]": 5}
    streamed.charge_usage = False  # e.g. a replay, which spent nothing
    fresh.settle(streamed, agent_pb2.InvokeChunk(final=True, usage=usage))
    assert fresh.budgets.spent("spiffe://td/client/a", "echo") == {"b[0]": 5}


def test_the_bearer_token_is_parsed_once_per_call() -> None:
    call = _call()
    with pytest.raises(TokenMissingError):
        call.bearer()
    call = Inbound(method="Invoke", request=None, wire_size=0, metadata={"authorization": "Bearer abc"},
                   auth_context={})
    assert call.bearer() == "abc"
    call.metadata = {}  # parsed once: later reads do not look at the metadata again
    assert call.bearer() == "abc"
    assert "abc" not in repr(call)


def test_the_handler_gets_the_call_on_its_context_and_only_through_the_interceptor() -> None:
    from hivemesh.mesh.callcontext import InboundContext, inbound_call, new_call_id

    class _Context:
        def time_remaining(self) -> float:
            return 1.5

        def peer(self) -> str:
            return "ipv4:127.0.0.1:1"

    call = _call()
    handed = InboundContext(_Context(), call)  # type: ignore[arg-type]
    assert inbound_call(handed) is call
    assert (handed.time_remaining(), handed.peer()) == (1.5, "ipv4:127.0.0.1:1")  # the rest is the wrapped one's
    with pytest.raises(RuntimeError, match="inbound interceptor"):
        inbound_call(_Context())  # type: ignore[arg-type]
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 and i[12] == "4" and i[16] in "89ab" for i in ids)
