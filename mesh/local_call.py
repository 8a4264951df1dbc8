"""What a local caller's `Mesh` call says in its metadata, read in one pass.

The sidecar's `Mesh.Call` needs two things from the agent's headers on every call: the call handle (whose
inbound call it acts for, if any) and the W3C trace context it carries on. Reading both in one walk over the
metadata, instead of one walk per question, is all this module does; what a handle means stays the sidecar's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

CALL_HANDLE_KEY = "x-hivemesh-call-handle"
"""Metadata naming the inbound call an agent's `Mesh.Call` acts for (delegation on behalf of its caller)."""
TRACE_KEYS = frozenset({"traceparent", "tracestate"})
"""W3C trace context: a local caller's `Mesh.Call` carries it on to the agent it reaches, so one trace spans the
languages (the only headers of a local caller the sidecar passes on; the rest are the mesh's to set)."""


def read_local_metadata(metadata: Iterable[tuple[str, Any]] | None) -> tuple[list[Any], tuple[tuple[str, str], ...]]:
    """(every call handle value sent, in order; the trace headers to pass on). Handle values are returned as
    sent (a bytes value is the caller's mistake, for the sidecar to refuse); trace headers only when text."""
    handles: list[Any] = []
    trace: list[tuple[str, str]] = []
    for key, value in metadata or ():
        if key == CALL_HANDLE_KEY:
            handles.append(value)
        elif key in TRACE_KEYS and isinstance(value, str):
            trace.append((key, value))
    return handles, tuple(trace)


__all__ = ["CALL_HANDLE_KEY", "TRACE_KEYS", "read_local_metadata"]
