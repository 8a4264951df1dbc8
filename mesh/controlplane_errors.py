"""The typed error of a failed call to the control plane (`rpc_failure`): one place for every client of it (the
node's `ControlPlaneClient`, the join at first start, the SDK's escalation and state clients, the CLI), so a control
plane that is down, refused or silent is named as such, with its address, by all of them."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from hivemesh.mesh.errors import DOMAIN, ControlPlaneUnavailableError, HivemeshError, from_rpc_error

UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""The codes gRPC ends a call with when no control plane answered (with no hivemesh ErrorInfo: `_said_by_hivemesh`)."""
_DETAILS = "grpc-status-details-bin"


def _said_by_hivemesh(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the status carries a hivemesh ErrorInfo: a control plane (or a layer of ours) decided it. gRPC's own
    statuses (a refused connection, a deadline that passed with no answer) carry none."""
    for key, value in exc.trailing_metadata() or ():
        if key != _DETAILS or not isinstance(value, bytes):
            continue
        try:
            details = status_pb2.Status.FromString(value).details
            for detail in details:
                info = error_details_pb2.ErrorInfo()
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and detail.Unpack(info) and info.domain == DOMAIN:
                    return True
        except DecodeError:
            continue
    return False


def rpc_failure(exc: grpc.aio.AioRpcError, where: str, *, timeout_s: float | None = None) -> HivemeshError:
    """The typed error of a failed call to the control plane at where ("": a caller holding only a channel).

    UNAVAILABLE or DEADLINE_EXCEEDED without a hivemesh ErrorInfo is gRPC's own: no control plane answered (down,
    refused, frozen, partitioned, or a TLS handshake it refused). It is CONTROL_PLANE_UNAVAILABLE naming where, not
    the AGENT_UNAVAILABLE or bare DEADLINE_EXCEEDED those codes map to. A deadline that passed keeps its code
    (DEADLINE_EXCEEDED): the request may have reached a paused control plane, which can still carry it out when
    it resumes, so it must not read as the UNAVAILABLE that callers take as safe to send again; timeout_s is the
    deadline the call had, for the message. What a control plane said (with its ErrorInfo) is its own error."""
    code = exc.code()
    if code not in UNREACHABLE or _said_by_hivemesh(exc):
        return from_rpc_error(exc)
    who = f"the control plane at {where}" if where else "the control plane"
    metadata = {"address": where[:256]} if where else {}
    if code == grpc.StatusCode.UNAVAILABLE:
        return ControlPlaneUnavailableError(f"{who} cannot be reached: {exc.details()}", metadata=metadata)
    within = f"within {timeout_s:g} s" if timeout_s else "before the call's deadline"
    if timeout_s:
        metadata["timeout_s"] = f"{timeout_s:g}"
    return ControlPlaneUnavailableError(f"{who} did not answer {within} (it may be overloaded, paused or partitioned)",
                                        metadata=metadata, code=grpc.StatusCode.DEADLINE_EXCEEDED)
