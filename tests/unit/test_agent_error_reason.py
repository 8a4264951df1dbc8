"""Who decided, as a status without hivemesh ErrorInfo is read: a sidecar relaying its agent's own plain failure
labels it AGENT_ERROR with the agent's code (`agents_own`); read anywhere else (`from_status_parts`) such a status
is not taken for an agent's, since the mesh's own link refusals and gRPC's stream resets look the same; a status
carrying a hivemesh reason keeps it, the mesh's own INTERNAL included."""

from __future__ import annotations

import grpc
import pytest

from hivemesh.mesh.errors import (
    AGENT_CODES,
    AgentError,
    AgentUnavailableError,
    DeadlineExceededError,
    HivemeshError,
    InvalidInputError,
    NotFoundError,
    agents_own,
    from_status_parts,
    to_status,
)


@pytest.mark.parametrize("code", sorted(AGENT_CODES, key=lambda c: c.value[0]), ids=lambda c: c.name)
def test_an_agents_plain_failure_is_relayed_as_agent_error_with_its_code(code: grpc.StatusCode) -> None:
    err = agents_own(code, "database exploded", ())
    assert type(err) is AgentError and (err.code, err.reason, err.message) == (code, "AGENT_ERROR",
                                                                               "database exploded")
    # As the caller reads the sidecar's relay: the same, and not gRPC's.
    sent = to_status(err)
    back = from_status_parts(sent.code, sent.details, sent.trailing_metadata)
    assert (type(back), back.code, back.reason, back.said_by_grpc) == (AgentError, code, "AGENT_ERROR", False)


def test_an_agents_own_details_and_grpcs_codes_are_relayed_as_they_came() -> None:
    own = to_status(InvalidInputError("input.x: bad"))  # an SDK agent's: its ErrorInfo says who decided
    assert agents_own(own.code, own.details, own.trailing_metadata) is None
    for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.CANCELLED, grpc.StatusCode.UNIMPLEMENTED):
        assert agents_own(code, "x", ()) is None, code


@pytest.mark.parametrize(("code", "message"), [
    (grpc.StatusCode.INVALID_ARGUMENT, "the call frame's request does not decode"),  # a link server's own refusal
    (grpc.StatusCode.UNKNOWN, "the peer answered with a Link message that does not decode"),  # a link client's
    (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2"),  # gRPC's own
    (grpc.StatusCode.PERMISSION_DENIED, "Received http2 header with status: 403"),  # a proxy in the way
])
def test_a_plain_status_read_elsewhere_is_not_taken_for_an_agents(code: grpc.StatusCode, message: str) -> None:
    err = from_status_parts(code, message, ())
    assert not isinstance(err, AgentError) and err.reason != "AGENT_ERROR" and err.said_by_grpc, err


@pytest.mark.parametrize(("code", "cls", "reason"), [
    (grpc.StatusCode.UNAVAILABLE, AgentUnavailableError, "AGENT_UNAVAILABLE"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError, "DEADLINE_EXCEEDED"),
    (grpc.StatusCode.UNIMPLEMENTED, HivemeshError, "UNIMPLEMENTED"),
])
def test_a_status_grpc_itself_gives_keeps_its_reason_and_said_by_grpc(
    code: grpc.StatusCode, cls: type[HivemeshError], reason: str
) -> None:
    err = from_status_parts(code, "Socket closed", ())
    assert (type(err), err.code, err.reason, err.said_by_grpc) == (cls, code, reason, True)


def test_the_meshs_own_reasons_are_kept() -> None:
    own = to_status(HivemeshError("a layer broke"))  # the mesh's own INTERNAL: reason INTERNAL
    back = from_status_parts(own.code, own.details, own.trailing_metadata)
    assert (type(back), back.code, back.reason, back.said_by_grpc) == (HivemeshError, grpc.StatusCode.INTERNAL,
                                                                       "INTERNAL", False)
    gone = to_status(NotFoundError("no such escalation"))
    back = from_status_parts(gone.code, gone.details, gone.trailing_metadata)
    assert (type(back), back.reason) == (NotFoundError, "NOT_FOUND")
