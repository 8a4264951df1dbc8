"""Hand-written protobuf wire bytes, for forwarders that append a field to a message they never decode.

Protobuf merges a message concatenated with more encoded fields (repeated fields append, maps add entries,
embedded messages merge), so a hop record or a metadata entry is added to a serialized InvokeResponse/InvokeChunk,
and call-chain entries to a serialized InvokeRequest, without re-encoding its payload. The only module that
writes wire bytes by hand.
"""

from __future__ import annotations

from collections.abc import Iterable

from hivemesh.v1 import agent_pb2

_LEN = 2  # wire type 2: length-delimited
_HOPS_FIELD = 15  # InvokeResponse.hops / InvokeChunk.hops
_METADATA_FIELD = 4  # InvokeResponse.metadata (map<string, string>)
_CONTEXT_FIELD = 4  # InvokeRequest.context
_CHAIN_FIELD = 7  # CallContext.chain


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


def chain_suffix(agents: Iterable[str]) -> bytes:
    """The bytes that append agents (SPIFFE ids) to a serialized InvokeRequest's `context.chain`: an embedded
    CallContext holding only them, which protobuf merges into the request's own."""
    body = b"".join(length_delimited(_CHAIN_FIELD, agent.encode()) for agent in agents)
    return length_delimited(_CONTEXT_FIELD, body)
