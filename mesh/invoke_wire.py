"""InvokeRequest and InvokeResponse bytes around a large payload, written and read without copying it through a
message.

Setting a 64 KiB payload into a protobuf message copies it into the message, and serializing copies it again;
parsing an answer copies it into the message, and reading the field out copies it once more. perf put copies at
16-21% of the CPU of both ends of a 64 KiB call (`memmove`, BENCHMARKS.md). Protobuf writes a message's fields in
field-number order, and the payload is an early field (`InvokeResponse.output` is field 1, `InvokeRequest.input`
field 2 after the capability), so the message's bytes are the fields before it, the payload's field, and the
serialization of the rest: written here as pieces joined once. A response's output, and a request's input, is
read as a view of the bytes received when the message is shaped as protobuf writes it (the payload field where
protobuf puts it, no other payload field later: protobuf would keep the last); any other message is read by
protobuf whole. A request read so leaves its input unset: the inbound chain reads it from `Inbound.input`. Both
ways are tested against protobuf byte for byte and read for read. Payloads under `BY_HAND` go through the
message: below it the Python costs more than the copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from hivemesh.mesh.link_wire import BY_HAND, lacks, read_varint, varint
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


def read_response(raw: bytes) -> tuple[agent_pb2.InvokeResponse, bytes | memoryview]:
    """(the response as protobuf reads raw, its output) where a large output is a view of raw and left unset in
    the message. Raises DecodeError when raw is not an InvokeResponse."""
    if len(raw) >= BY_HAND and raw[0] == _OUTPUT[0]:
        size, start = read_varint(raw, 1, len(raw))
        end = start + size
        if size >= 0 and end <= len(raw) and lacks(raw, end, len(raw), 1):
            return agent_pb2.InvokeResponse.FromString(raw[end:]), memoryview(raw)[start:end]
    message = agent_pb2.InvokeResponse.FromString(raw)
    return message, message.output


def read_request(raw: bytes | memoryview) -> tuple[agent_pb2.InvokeRequest, bytes | memoryview]:
    """(the request as protobuf reads raw, its input) where a large input is a view of raw and left unset in the
    message: raw shaped as `request` writes it (a capability, then the input, then no other input field).
    Raises DecodeError when raw is not an InvokeRequest."""
    end = len(raw)
    if end >= BY_HAND:
        at = 0
        if raw[0] == _CAPABILITY[0]:
            size, start = read_varint(raw, 1, end)
            at = start + size if size >= 0 else end
        if at < end and raw[at] == _INPUT[0]:
            size, start = read_varint(raw, at + 1, end)
            stop = start + size
            if size >= 0 and stop <= end and lacks(raw, stop, end, 2):
                rest = bytes(raw[:at]) + bytes(raw[stop:]) if at else bytes(raw[stop:])
                view = raw[start:stop] if isinstance(raw, memoryview) else memoryview(raw)[start:stop]
                return agent_pb2.InvokeRequest.FromString(rest), view
    message = agent_pb2.InvokeRequest.FromString(raw if isinstance(raw, bytes) else bytes(raw))
    return message, message.input


def parse_request(raw: bytes) -> agent_pb2.InvokeRequest:
    """InvokeRequest's deserializer for a handler that reads the input from its call's `Inbound.input` (the
    SDK's): behind the inbound chain it gets the request with a large input left unset (`read_request`), and
    any other handler gets it whole."""
    return agent_pb2.InvokeRequest.FromString(raw)


def answer(method: str, data: bytes) -> agent_pb2.InvokeResponse | agent_pb2.InvokeChunk:
    """The answer data carries, for the fields beside its payload (usage, state, content type): an InvokeStream
    chunk whole, a unary response without a large output (`read_response`: an observer reading the usage of an
    SDK agent's answer, which comes as bytes, must not copy its output out). Raises DecodeError."""
    if method == "InvokeStream":
        return agent_pb2.InvokeChunk.FromString(data)
    return read_response(data)[0]


__all__ = ["BY_HAND", "answer", "parse_request", "read_request", "read_response", "request", "response"]
