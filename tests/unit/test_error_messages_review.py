"""The wording of refusals, with real objects and no mesh: an agent gone mid-call (`went_away`), an input one message
cannot carry (`check_request_size`), and the `hivemesh allow` fix a default deny or grant refusal names (`allow_hint`).
The same paths on the real mesh: tests/integration/test_error_messages_review.py."""

from __future__ import annotations

import grpc
import pytest

from hivemesh.controlplane.server import _grant_hint
from hivemesh.mesh.authz import AuthzRequest, allow_hint, compile_authz
from hivemesh.mesh.errors import (
    AgentUnavailableError,
    DeadlineExceededError,
    PayloadTooLargeError,
    StaleRegistrationError,
    from_rpc_error,
    to_status,
)
from hivemesh.mesh.outbound.attempts import went_away
from hivemesh.mesh.outbound.call import OutboundCall
from hivemesh.mesh.outbound.pipeline import check_request_size
from hivemesh.mesh.policy import PolicyDoc
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.v1 import agent_pb2, mesh_pb2

TD = "example.test"
ALICE = f"spiffe://{TD}/client/alice"
ECHO = f"spiffe://{TD}/agent/echo"
HINT = "; an operator allows it with `hivemesh allow client/alice echo --agent agent/echo`"


# --- an agent gone mid-call -----------------------------------------------------------------------------------------
def _instance(*, idempotent: bool = False) -> mesh_pb2.AgentInstance:
    card = agent_pb2.AgentCard(name="w", capabilities=[agent_pb2.Capability(name="work", idempotent=idempotent)])
    return mesh_pb2.AgentInstance(instance_id="w-1", identity=f"spiffe://{TD}/agent/w", card=card)


def _by_grpc(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A failed call as gRPC itself ends one: a status with no hivemesh ErrorInfo."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _call(key: str = "") -> OutboundCall:
    return OutboundCall("work", b"req", (), None, None, key)


def test_a_connection_gone_mid_call_says_which_agent_and_when_a_resend_is_safe() -> None:
    cause = _by_grpc(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)")
    raw = from_rpc_error(cause)
    assert raw.said_by_grpc and raw.message == "Stream removed (Socket closed)"
    head = ("agent w (instance w-1) went away during the call to 'work' (its process stopped or its connection broke "
            "before it answered): the call may have run, in part or in full; ")
    tail = " (gRPC: Stream removed (Socket closed))"
    for instance, key, resend in [
        (_instance(), "", "it is safe to send again only with an idempotency key (idempotency_key=), and this call "
                          "carried none: sent again, it could run twice"),
        (_instance(), "k-1", "it is safe to send again only with the same idempotency key, which this call carried"),
        (_instance(idempotent=True), "", "'work' is declared idempotent, so sending it again is safe"),
    ]:
        worded = went_away(raw, _call(key), instance)
        assert worded.message == head + resend + tail
        # What callers and retry policies match on is as it was; the cause is gRPC's error still.
        assert type(worded) is AgentUnavailableError and worded.said_by_grpc
        assert (worded.code, worded.reason) == (grpc.StatusCode.UNAVAILABLE, "AGENT_UNAVAILABLE")
        assert worded.__cause__ is cause
        assert worded.metadata == {"capability": "work", "agent": f"spiffe://{TD}/agent/w", "instance": "w-1",
                                   "may_have_run": "true"}


def test_errors_a_hivemesh_layer_decided_or_not_unavailable_are_left_as_they_are() -> None:
    decided = [  # a status with hivemesh's ErrorInfo: a layer decided it, and its words stand
        AgentUnavailableError("the agent could not be reached"),
        StaleRegistrationError("routed by a registration that is gone"),
    ]
    for err in decided:
        status = to_status(err)
        remote = from_rpc_error(grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(),
                                                     grpc.aio.Metadata(*status.trailing_metadata), status.details))
        assert not remote.said_by_grpc
        assert went_away(remote, _call(), _instance()) is remote
    timed_out = from_rpc_error(_by_grpc(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert timed_out.said_by_grpc and isinstance(timed_out, DeadlineExceededError)
    assert went_away(timed_out, _call(), _instance()) is timed_out
    local = AgentUnavailableError("made here")
    assert not local.said_by_grpc and went_away(local, _call(), _instance()) is local


# --- an input one message cannot carry ------------------------------------------------------------------------------
def test_a_request_over_one_message_is_refused_naming_capability_size_limit_and_what_to_do() -> None:
    check_request_size("shout", b"x" * MAX_MESSAGE_BYTES)  # exactly the limit goes
    with pytest.raises(PayloadTooLargeError) as caught:
        check_request_size("shout", b"x" * (MAX_MESSAGE_BYTES + 1))
    err = caught.value
    assert err.message == (
        f"the call to capability 'shout' is {MAX_MESSAGE_BYTES + 1} bytes with its input, over the "
        f"{MAX_MESSAGE_BYTES}-byte limit of one mesh message, so it was not sent: send less (split the input over "
        "several calls), or put the data where the agent can read it and send a reference to it (a URL, a file or "
        "object key)")
    assert err.metadata == {"capability": "shout", "limit_bytes": str(MAX_MESSAGE_BYTES),
                            "size_bytes": str(MAX_MESSAGE_BYTES + 1)}


# --- refusals that name `hivemesh allow` ----------------------------------------------------------------------------
def _authz(rules: list[dict[str, object]] | None) -> dict[str, PolicyDoc]:
    return {} if rules is None else {"p": PolicyDoc(kind="authz", name="p", spec={"rules": rules})}


def _request(capability: str | None = "echo", caller: str = ALICE) -> AuthzRequest:
    return AuthzRequest(caller=caller, capability=capability, action="invoke", agent=ECHO, principal=caller)


def test_a_default_deny_names_the_allow_command() -> None:
    what = f"{ALICE} invoke echo on {ECHO}"
    none = compile_authz(_authz(None)).decide(_request())
    assert not none.allowed
    assert none.reason == f"no authz policy exists, so every call is denied (default deny): {what}{HINT}"
    operators = {"callers": [f"spiffe://{TD}/operator/*"]}
    others = compile_authz(_authz([{"name": "ops", "action": "ALLOW", "from": operators}]))
    assert others.decide(_request()).reason == f"no authz rule allows {what} (default deny){HINT}"
    # A caller of another trust domain is named in full (the CLI completes KIND/NAME with the operator's own).
    stranger = "spiffe://elsewhere.test/client/bob"
    assert others.decide(_request(caller=stranger)).reason.endswith(
        f"; an operator allows it with `hivemesh allow {stranger} echo --agent agent/echo`")


def test_no_allow_command_where_it_would_not_help_or_could_carry_a_callers_text() -> None:
    deny = compile_authz(_authz([
        {"name": "everyone", "action": "ALLOW", "from": {"callers": [f"spiffe://{TD}/*"]}},
        {"name": "not-alice", "action": "DENY", "from": {"callers": [ALICE]}},
    ]))
    assert deny.decide(_request()).reason == f"p/not-alice denies {ALICE} invoke echo on {ECHO}"  # a rule: no hint
    table = compile_authz(_authz(None))
    assert "hivemesh allow" not in table.decide(_request(capability=None)).reason  # Describe: no capability
    hostile = "echo`; rm -rf ~ #"
    assert "hivemesh allow" not in table.decide(_request(capability=hostile)).reason
    assert allow_hint("spiffe://bad", ["echo"], ECHO) == "" and allow_hint(ALICE, ["echo"], "not-an-id") == ""


def test_a_grant_refusal_names_what_the_agent_offers_of_what_was_asked() -> None:
    hint = "; an operator allows it with `hivemesh allow client/alice {} --agent agent/echo`"
    assert _grant_hint(ALICE, [], ["echo"], ECHO) == hint.format("echo")  # any capability, the agent's only one
    # Any capability of several: the operator chooses (a hint naming them all would grant more than the call needs).
    assert _grant_hint(ALICE, [], ["echo", "shout"], ECHO) == hint.format("CAPABILITY...")
    assert _grant_hint(ALICE, [], None, ECHO) == hint.format("CAPABILITY...")  # agent not registered
    assert _grant_hint(ALICE, [], [], ECHO) == ""  # it offers nothing: no grant helps
    assert _grant_hint(ALICE, ["echo", "nope"], ["echo", "shout"], ECHO) == hint.format("echo")
    assert _grant_hint(ALICE, ["nope"], ["echo"], ECHO) == ""  # not offered: no grant helps
    assert _grant_hint(ALICE, ["translate"], None, ECHO) == hint.format("translate")
    many = [f"capability-{n:03d}" for n in range(40)]
    assert _grant_hint(ALICE, many, None, ECHO) == hint.format("CAPABILITY...")  # too long for one clause
