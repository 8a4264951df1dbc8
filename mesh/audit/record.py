"""What goes into an audit record: the decision a call's outcome stands for, and the fields of one inbound
decision (caller, token ids, trace id; bounded, with unverified claims marked as such)."""

from __future__ import annotations

import base64
import binascii
import datetime
import math
import re
import time
from typing import Any, Final

import grpc

from hivemesh.mesh import json_depth, tracing
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.pki import load_cert, uri_sans

FORMAT: Final = 1
"""The record format version (`v`)."""
MAX_TEXT: Final = 256
_TRACEPARENT_RE = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")

# Decisions, by what the mesh did with the call.
ALLOW: Final = "allow"
DENY: Final = "deny"
INVALID: Final = "invalid"
RATE_LIMITED: Final = "rate_limited"
CIRCUIT_OPEN: Final = "circuit_open"
ERROR: Final = "error"
DECISIONS: Final = frozenset({ALLOW, DENY, INVALID, RATE_LIMITED, CIRCUIT_OPEN, ERROR})

_INVALID_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
})
_RATE_REASONS = frozenset({"RATE_LIMITED", "OVERLOADED"})


def classify(err: HivemeshError | None, code: grpc.StatusCode) -> str:
    """The decision a call's outcome stands for."""
    if err is None:
        return ALLOW if code == grpc.StatusCode.OK else ERROR
    reason = err.reason
    if reason in _RATE_REASONS:
        return RATE_LIMITED
    if reason == "CIRCUIT_OPEN":
        return CIRCUIT_OPEN
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return DENY
    if code in _INVALID_CODES:
        return INVALID
    return ERROR


_second: tuple[int, str] = (-1, "")
"""The last whole second utc_iso formatted, and its text up to the seconds (one second's records share it)."""


def _utc_iso_datetime(ts: float) -> str:
    # isoformat is strftime("%Y-%m-%dT%H:%M:%S.%fZ") with "+00:00" for the "Z", at about half the cost.
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def utc_iso(ts: float) -> str:
    """RFC 3339 UTC with microseconds: sortable as text, exact as an audit timestamp.

    Exactly `datetime.fromtimestamp(ts, UTC)`'s time (its microseconds rounded half to even the same way), with the
    date and time of day formatted once per second: every inbound record is stamped on the serving node's event
    loop, and datetime's formatting was ~3% of a 64 KiB call's work there (py-spy, BENCHMARKS.md, 5 Dec)."""
    global _second
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    if not 0 <= us < 1_000_000 or not 0 <= whole < 253402300800:  # rounds up into the next second; not 1970-9999
        return _utc_iso_datetime(ts)
    sec = int(whole)
    done, text = _second
    if sec != done:
        text = datetime.datetime.fromtimestamp(sec, datetime.UTC).isoformat()[:19]
        _second = (sec, text)
    return f"{text}.{us:06d}Z"


def parse_time(text: str) -> float:
    """Unix seconds from an RFC 3339 time (as records carry), a unix number, or a relative '-5m'/'-2h'/'-1d'.

    ValueError for anything else, nan and infinities included (they compare false with every time, so a filter
    of them would silently match nothing or everything); its message quotes at most 128 characters of text, as
    it may reach a status that must stay small."""
    text = text.strip()
    rel = re.fullmatch(r"-(\d+(?:\.\d+)?)([smhd])", text)
    if rel:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}[rel.group(2)]
        return _finite(time.time() - float(rel.group(1)) * mult, text)
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return _finite(value, text)
    try:
        dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"bad time {short(text, 128)!r}: use RFC 3339 (2025-01-31T12:00:00Z), unix seconds or "
                         "-15m") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.UTC)
    return dt.timestamp()


def _finite(value: float, text: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"bad time {short(text, 128)!r}: not a finite number")
    return value


def short(text: str, limit: int = MAX_TEXT) -> str:
    """text cut to limit characters (an ellipsis marks the cut): records stay bounded."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _meta(call: Inbound, key: str) -> str:
    value = call.metadata.get(key)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value if isinstance(value, str) else ""


def _unverified_token_ids(call: Inbound) -> dict[str, str]:
    """jti/sub a refused token *claims* (unverified, for forensics only; bounded and marked as such)."""
    try:
        token = call.bearer()
    except HivemeshError:  # none, not a Bearer credential, or more than one: nothing to read
        return {}
    parts = token.split(".")
    if len(parts) != 3 or len(parts[1]) > 8192:
        return {}
    try:
        payload = json_depth.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error, RecursionError):  # a refused token's claims may be anything
        return {}
    if not isinstance(payload, dict):
        return {}
    out = {}
    for name in ("jti", "sub"):
        v = payload.get(name)
        if isinstance(v, str):
            out[f"claimed_{name}"] = short(v, 128)
    return out


def _unverified_peer(call: Inbound) -> str:
    pem = call.auth_context.get("x509_pem_cert") if call.auth_context else None
    if not pem:
        return ""
    try:
        sans = uri_sans(load_cert(pem[0] if isinstance(pem[0], bytes) else str(pem[0]).encode()))
    except ValueError:
        return ""
    return short(",".join(sans), 256)


def decision_fields(
    call: Inbound, err: HivemeshError | None, code: grpc.StatusCode, elapsed_s: float, *, now: float
) -> dict[str, Any]:
    """The record fields for one inbound decision (without node/instance and chain members)."""
    req = call.request
    rec: dict[str, Any] = {
        "v": FORMAT,
        "time": utc_iso(now),
        "kind": "inbound",
        "method": call.method,
        "capability": short(req.capability, 128) if req is not None else "",
        "decision": classify(err, code),
        "status": code.name,
        "reason": err.reason if err is not None else ("" if code == grpc.StatusCode.OK else code.name),
        "latency_us": max(int(elapsed_s * 1e6), 0),
        "caller": str(call.peer.spiffe_id) if call.peer is not None else "",
        "remote": call.notes.get("remote", ""),
    }
    if err is not None:
        rec["message"] = short(err.message)
    if call.peer is None:
        claimed = _unverified_peer(call)
        if claimed:
            rec["caller_unverified"] = claimed
    claims = call.claims
    if claims is not None:
        rec["jti"] = claims.jti
        rec["principal"] = claims.subject
        chain = list(claims.delegation)
        if len(chain) > 1:
            rec["chain"] = chain
    elif err is not None:
        rec.update(_unverified_token_ids(call))
    ctx = req.context if req is not None else None
    call_id = short(ctx.call_id, 128) if ctx is not None else ""
    ids = tracing.current_ids()  # the server span's trace (a child of the caller's traceparent, or a new root)
    if ids is not None:
        rec["trace_id"] = ids[0]
    else:
        traceparent = _meta(call, "traceparent")
        m = _TRACEPARENT_RE.fullmatch(traceparent) if traceparent else None
        rec["trace_id"] = m.group(1) if m else call_id
    if call_id:
        rec["call_id"] = call_id
    for note in ("rule", "dry_run", "signed", "output_screen"):
        if note in call.notes:
            rec[note] = call.notes[note]
    return rec

