"""Who decided, as a status without hivemesh ErrorInfo is read back (`from_status_parts`): a code only an agent's
own code gives is AGENT_ERROR with that code; a code gRPC itself gives keeps the mesh's reason for it and
`said_by_grpc`; a status carrying a hivemesh reason keeps it, the mesh's own INTERNAL included."""

from __future__ import annotations

import grpc
import pytest

from hivemesh.mesh.errors import (
    AGENT_CODES,
    AgentError,
    AgentUnavailableError,
    DeadlineExceededError,
    HivemeshError,
    NotFoundError,
    from_status_parts,
    to_status,
    typed_error,
)


@pytest.mark.parametrize("code", sorted(AGENT_CODES, key=lambda c: c.value[0]), ids=lambda c: c.name)
def test_an_agents_status_without_details_is_agent_error_with_its_code(code: grpc.StatusCode) -> None:
    err = from_status_parts(code, "database exploded", ())
    assert type(err) is AgentError and (err.code, err.reason, err.message) == (code, "AGENT_ERROR",
                                                                               "database exploded")
    assert not err.said_by_grpc
    # Re-encoded by the caller's sidecar and read again (a second hop): the same.
    again = to_status(err)
    back = from_status_parts(again.code, again.details, again.trailing_metadata)
    assert (type(back), back.code, back.reason) == (AgentError, code, "AGENT_ERROR")
    assert typed_error(code, "", "x").reason == "AGENT_ERROR"


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
