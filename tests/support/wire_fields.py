"""Top-level protobuf fields read by hand, as a decoder that keeps only a singular field's LAST occurrence
(protobufjs) sees them: for asserting that a request carries exactly one `InvokeRequest.context`."""

from __future__ import annotations

from hivemesh.v1 import agent_pb2

CONTEXT = 4  # InvokeRequest.context (protos/hivemesh/v1/agent.proto)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):  # at most 10 bytes
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise AssertionError(f"a varint longer than 10 bytes at {pos}")


def top_level(data: bytes) -> list[tuple[int, bytes]]:
    """(field number, value bytes) of each top-level field of a serialized message, in wire order; a varint
    field's value is its encoding. No groups (the requests here hold none)."""
    fields, pos = [], 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        kind = tag & 7
        if kind == 2:
            size, pos = _varint(data, pos)
            start, pos = pos, pos + size
        elif kind == 0:
            start = pos
            _, pos = _varint(data, pos)
        else:
            assert kind in (1, 5), kind
            start, pos = pos, pos + (8 if kind == 1 else 4)
        fields.append((tag >> 3, data[start:pos]))
    assert pos == len(data)
    return fields


def the_context(onward: bytes) -> agent_pb2.CallContext:
    """The request's one context field, decoded alone (as a last-occurrence-wins decoder reads it)."""
    contexts = [value for number, value in top_level(onward) if number == CONTEXT]
    assert len(contexts) == 1, f"{len(contexts)} context fields"
    return agent_pb2.CallContext.FromString(contexts[0])
