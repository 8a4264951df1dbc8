"""InvokeRequest and InvokeResponse bytes around a large payload, written and read without copying it through a
message.

Setting a 64 KiB payload into a protobuf message copies it into the message, and serializing copies it again;
parsing an answer copies it into the message, and reading the field out copies it once more. perf put copies at
16-21% of the CPU of both ends of a 64 KiB call (`memmove`, BENCHMARKS.md). Protobuf writes a message's fields in
field-number order, and the payload is an early field (`InvokeResponse.output` is field 1, `InvokeRequest.input`
field 2 after the capability), so the message's bytes are the fields before it, the payload's field, and the
serialization of the rest: written here as pieces joined once. A response's output is read as a view of the
bytes received when the answer is shaped as protobuf writes it (output first, no other output field later:
protobuf would keep the last); any other answer is read by protobuf whole. Both are tested against protobuf byte
for byte and read for read. Payloads under `BY_HAND` go through the message: below it the Python costs more than
the copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from hivemesh.mesh.link_wire import BY_HAND, read_varint, varint
from hivemesh.v1 import agent_pb2

_OUTPUT: Final = b"\x0a"  # InvokeResponse.output: field 1, length-delimited
_CAPABILITY: Final = b"\x0a"  # InvokeRequest.capability: field 1, length-delimited
_INPUT: Final = b"\x12"  # InvokeRequest.input: field 2, length-delimited


def response(output: Sequence[bytes], rest: agent_pb2.InvokeResponse) -> bytes:
    """The bytes of rest (its output unset) with output, given as pieces, as its output field."""
    size = sum(map(len, output))
    if size < BY_HAND:
        rest.output = output[0] if len(output) == 1 else b"".join(output)
        return rest.SerializeToString()
    return b"".join((_OUTPUT, varint(size), *output, rest.SerializeToString()))


def request(capability: str, data: Sequence[bytes], rest: agent_pb2.InvokeRequest) -> bytes:
    """The bytes of rest (its capability and input unset) with capability, and data, given as pieces, as input."""
    size = sum(map(len, data))
    if size < BY_HAND:
        rest.capability = capability
        rest.input = data[0] if len(data) == 1 else b"".join(data)
        return rest.SerializeToString()
    name = capability.encode()
    head = _CAPABILITY + varint(len(name)) + name if name else b""
    return b"".join((head, _INPUT, varint(size), *data, rest.SerializeToString()))


def _without_output(raw: bytes, pos: int) -> bool:
    """Whether raw[pos:] is whole fields, none of them field 1 (then protobuf keeps the output read before it).
    False for anything it cannot walk (a group, a cut field): protobuf then reads the whole message."""
    end = len(raw)
    while pos < end:
        tag, pos = read_varint(raw, pos, end)
        if tag < 0 or tag >> 3 == 1:
            return False
        kind = tag & 7
        if kind == 0:
            _, after = read_varint(raw, pos, end)
            if after == pos:
                return False
            pos = after
        elif kind == 2:
            size, start = read_varint(raw, pos, end)
            if size < 0:
                return False
            pos = start + size
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        else:
            return False
    return pos == end


def read_response(raw: bytes) -> tuple[agent_pb2.InvokeResponse, bytes | memoryview]:
    """(the response as protobuf reads raw, its output) where a large output is a view of raw and left unset in
    the message. Raises DecodeError when raw is not an InvokeResponse."""
    if len(raw) >= BY_HAND and raw[0] == _OUTPUT[0]:
        size, start = read_varint(raw, 1, len(raw))
        end = start + size
        if size >= 0 and end <= len(raw) and _without_output(raw, end):
            return agent_pb2.InvokeResponse.FromString(raw[end:]), memoryview(raw)[start:end]
    message = agent_pb2.InvokeResponse.FromString(raw)
    return message, message.output


def answer(method: str, data: bytes) -> agent_pb2.InvokeResponse | agent_pb2.InvokeChunk:
    """The answer data carries, for the fields beside its payload (usage, state, content type): an InvokeStream
    chunk whole, a unary response without a large output (`read_response`: an observer reading the usage of an
    SDK agent's answer, which comes as bytes, must not copy its output out). Raises DecodeError."""
    if method == "InvokeStream":
        return agent_pb2.InvokeChunk.FromString(data)
    return read_response(data)[0]


__all__ = ["BY_HAND", "answer", "read_response", "request", "response"]
