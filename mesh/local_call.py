"""What a local caller's `Mesh` call says in its metadata, read in one pass.

The sidecar's `Mesh.Call` needs two things from the agent's headers on every call: the call handle (whose
inbound call it acts for, if any) and the W3C trace context it carries on. Reading both in one walk over the
metadata, instead of one walk per question, is all this module does; what a handle means stays the sidecar's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final

CALL_HANDLE_KEY = "x-hivemesh-call-handle"
"""Metadata naming the inbound call an agent's `Mesh.Call` acts for (delegation on behalf of its caller)."""
TRACE_KEYS = frozenset({"traceparent", "tracestate"})
"""W3C trace context: a local caller's `Mesh.Call` carries it on to the agent it reaches, so one trace spans the
languages (the only headers of a local caller the sidecar passes on; the rest are the mesh's to set)."""
TRACEPARENT_RE: Final = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(?:-[\x21-\x7e]*)?")
"""A W3C traceparent (Trace Context, level 1): version (not ff), trace id and parent id (neither all zeros), flags;
a version after 00 may append fields. Version 00 is exactly its four fields (`valid_traceparent`)."""


def valid_traceparent(value: str) -> bool:
    """Whether value is a traceparent a receiver may continue: W3C says to ignore one that is not (and the tracestate
    beside it), and start a new trace, rather than pass it on."""
    if TRACEPARENT_RE.fullmatch(value) is None:
        return False
    return not value.startswith("00") or len(value) == 55


def read_local_metadata(metadata: Iterable[tuple[str, Any]] | None) -> tuple[list[Any], tuple[tuple[str, str], ...]]:
    """(every call handle value sent, in order; the trace headers to pass on). Handle values are returned as
    sent (a bytes value is the caller's mistake, for the sidecar to refuse); trace headers only when text, and only
    with one valid traceparent: an invalid one (or several) is dropped with its tracestate, as W3C Trace Context
    says, so the agent reached starts a trace of its own instead of receiving "zz" as its parent."""
    handles: list[Any] = []
    trace: list[tuple[str, str]] = []
    for key, value in metadata or ():
        if key == CALL_HANDLE_KEY:
            handles.append(value)
        elif key in TRACE_KEYS and isinstance(value, str):
            trace.append((key, value))
    if trace:
        parents = [value for key, value in trace if key == "traceparent"]
        if len(parents) != 1 or not valid_traceparent(parents[0]):
            return handles, ()
    return handles, tuple(trace)


__all__ = ["CALL_HANDLE_KEY", "TRACEPARENT_RE", "TRACE_KEYS", "read_local_metadata", "valid_traceparent"]
