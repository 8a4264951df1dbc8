"""Hand-written protobuf wire bytes, for forwarders that append a field to a message they never decode.

Protobuf merges a message concatenated with more encoded fields (repeated fields append, maps add entries,
embedded messages merge), so a hop record or a metadata entry is added to a serialized InvokeResponse/InvokeChunk,
and call-chain entries to a serialized InvokeRequest, without re-encoding its payload. The only module that
writes wire bytes by hand.

Only repeated fields and maps are appended so when the message may already hold the field: a second occurrence
of an embedded message is merged by Google's protobuf, but protobufjs (grpc-js agents) and other decoders keep
only the last one, which would drop the caller's CallContext (its idempotency key, call id...). So the chain goes
on as an appended context only into a request without one; into one with a context, `with_context` writes the
one context field in place of the caller's (re-encoding only the context, the payload copied once as before).
"""

from __future__ import annotations

from collections.abc import Iterable

from hivemesh.mesh import link_wire
from hivemesh.v1 import agent_pb2

_LEN = 2  # wire type 2: length-delimited
_HOPS_FIELD = 15  # InvokeResponse.hops / InvokeChunk.hops
_METADATA_FIELD = 4  # InvokeResponse.metadata (map<string, string>)
_CONTEXT_FIELD = 4  # InvokeRequest.context
_CHAIN_FIELD = 7  # CallContext.chain
_CONTEXT_TAG = bytes(((_CONTEXT_FIELD << 3) | _LEN,))


def varint(n: int) -> bytes:
    """n (>= 0) as a base-128 varint."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def length_delimited(field: int, body: bytes) -> bytes:
    """Field number `field` holding body (a string, bytes or embedded message)."""
    return varint((field << 3) | _LEN) + varint(len(body)) + body


def hop_suffix(hop: agent_pb2.Hop) -> bytes:
    """The bytes that append hop to a serialized InvokeResponse/InvokeChunk."""
    return length_delimited(_HOPS_FIELD, hop.SerializeToString())


def metadata_entry(key: str, value: str) -> bytes:
    """The bytes that add key=value to a serialized InvokeResponse's metadata map."""
    entry = length_delimited(1, key.encode()) + length_delimited(2, value.encode())
    return length_delimited(_METADATA_FIELD, entry)


def chain_entries(agents: Iterable[str]) -> bytes:
    """The bytes that append agents (SPIFFE ids) to a serialized CallContext's `chain`."""
    return b"".join(length_delimited(_CHAIN_FIELD, agent.encode()) for agent in agents)


def chain_suffix(agents: Iterable[str]) -> bytes:
    """The bytes that append agents (SPIFFE ids) to a serialized InvokeRequest that has NO `context`: an embedded
    CallContext holding only them (a request with one gets `with_context`: not every decoder merges two)."""
    return length_delimited(_CONTEXT_FIELD, chain_entries(agents))


def _spans(raw: bytes, number: int) -> list[tuple[int, int]] | None:
    """Where the top-level fields numbered number are in raw, a serialized message; None if raw is not
    whole fields of the kinds walked here (a group, a 10-byte varint): the caller then has protobuf re-encode."""
    spans: list[tuple[int, int]] = []
    pos, end = 0, len(raw)
    while pos < end:
        start = pos
        tag = raw[pos]  # one-byte tags and lengths (field numbers up to 15, fields under 128 bytes) inline
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = link_wire.read_varint(raw, pos, end)
            if tag < 0:
                return None
        kind = tag & 7
        if kind == _LEN:
            if pos < end and raw[pos] < 0x80:
                pos += 1 + raw[pos]
            else:
                size, pos = link_wire.read_varint(raw, pos, end)
                if size < 0:
                    return None
                pos += size
        elif kind == 0:
            _, after = link_wire.read_varint(raw, pos, end)
            if after == pos:
                return None
            pos = after
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        else:
            return None
        if tag >> 3 == number:
            spans.append((start, pos))
    return spans if pos == end else None


def with_context(request: bytes, context: bytes) -> bytes:
    """request (a serialized InvokeRequest) with context (a serialized CallContext) as its only `context` field,
    in place of every one it held (context must carry their fields: protobuf's merge of them, as decoded). The
    rest of request is kept as its bytes, its payload not re-encoded."""
    field = b"".join((_CONTEXT_TAG, link_wire.varint(len(context)), context))
    spans = _spans(request, _CONTEXT_FIELD)
    if spans is None:  # not walked by hand: protobuf re-encodes the whole request
        message = agent_pb2.InvokeRequest.FromString(request)
        message.ClearField("context")
        return message.SerializeToString() + field
    view = memoryview(request)
    pieces: list[bytes | memoryview] = []
    at = 0
    for start, stop in spans:
        pieces.append(view[at:start])
        at = stop
    pieces.append(view[at:])
    pieces.append(field)
    return b"".join(pieces)
