"""A Link's frames as wire bytes: a large payload written as it is, and an answer's response read with one slice.

A frame's one large field is its call's request or its answer's response, and each trip through a protobuf
message copies it: set into a frame, serialized (the encoder's buffer, then bytes), packed into a batch (every
frame serialized and parsed again), parsed on arrival, then taken out of the message. perf on `bench/peers.py`'s
agent at 64 KiB and 16 in flight: copying was 13% of its CPU, the largest single cost.

Each step here is done by hand only where it measured faster than protobuf's C (`timeit`, same process,
BENCHMARKS.md): a frame whose payload is at least `BY_HAND` is written as pieces around the payload; a batch is
always the frames' pieces behind their lengths (protobuf's encoding of a repeated message field), joined once; an
OK answer (alone or in a batch) is read by slicing its response out; a call whose request is at least `BY_HAND`
is read with its request as a view of the message (its metadata and timeout by protobuf, from the bytes after
it), which the inbound chain reads without copying (`invoke_wire.read_request`). Smaller calls and every other
frame are read by protobuf (a batch whole, or frame by frame after one read by hand): for them the Python costs
more than it saves.

What this module writes is what protobuf writes (tested byte for byte), and it reads by hand only shapes it can
read exactly (any other field order, a field twice, an unknown field or an error answer goes to protobuf), so a
frame always means what protobuf reads in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

from google.protobuf.message import DecodeError

from hivemesh.v1 import agent_pb2

_ID: Final = 0x08  # LinkFrame.id: field 1, varint
_CALL: Final = 0x12  # LinkFrame.call: field 2, length-delimited
_ANSWER: Final = 0x1A  # LinkFrame.answer: field 3, length-delimited
_BATCH: Final = b"\x2a"  # LinkFrame.batch: field 5, length-delimited
_RESPONSE: Final = 0x1A  # LinkAnswer.response: field 3, length-delimited
_REQUEST: Final = 0x0A  # LinkCall.request: field 1, length-delimited
_MAX_VARINT: Final = 9  # bytes of a varint read by hand (up to 2**63 - 1); a longer one goes to protobuf
BY_HAND: Final = 16 * 1024
"""Payload bytes from which a frame is written by hand: below it, building the protobuf message is faster than the
Python that saves its copies (parity at 16 KiB; by hand 0.52x the time for an answer at 64 KiB, 0.79x for a
call)."""


_SMALL: Final = tuple(bytes((n,)) for n in range(128))


def varint(value: int) -> bytes:
    """value (0 <= value < 2**64) as a protobuf varint (up to 2 MiB, the sizes of frames and payloads, without a
    loop)."""
    if value < 0x4000:
        return _SMALL[value] if value < 0x80 else bytes(((value & 0x7F) | 0x80, value >> 7))
    if value < 0x200000:
        return bytes(((value & 0x7F) | 0x80, ((value >> 7) & 0x7F) | 0x80, value >> 14))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)




@dataclass(slots=True)
class Outgoing:
    """A frame to send: the pieces of its wire form (joined only when its message is written) and their size."""

    id: int
    pieces: tuple[bytes, ...]
    size: int


def _frame(call_id: int, tag: int, body: Sequence[bytes], body_size: int) -> Outgoing:
    head = (b"\x08" + varint(call_id) if call_id else b"") + bytes((tag,)) + varint(body_size)
    return Outgoing(call_id, (head, *body), len(head) + body_size)


def call_frame(call_id: int, request: bytes, call: Any) -> Outgoing:
    """A call frame carrying request, with call the rest of its `LinkCall` (metadata, timeout; its request unset)."""
    if len(request) < BY_HAND:
        frame = agent_pb2.LinkFrame(id=call_id)
        frame.call.CopyFrom(call)
        frame.call.request = request
        return message_frame(frame)
    rest = call.SerializeToString()
    field_head = b"\x0a" + varint(len(request))
    return _frame(call_id, _CALL, (field_head, request, rest), len(field_head) + len(request) + len(rest))


def answer_frame(call_id: int, response: bytes) -> Outgoing:
    """The answer frame of a call that ended OK with this response."""
    if len(response) < BY_HAND:
        frame = agent_pb2.LinkFrame(id=call_id)
        frame.answer.response = response
        return message_frame(frame)
    field_head = b"\x1a" + varint(len(response))
    return _frame(call_id, _ANSWER, (field_head, response), len(field_head) + len(response))


def message_frame(frame: Any) -> Outgoing:
    """Any other frame (a cancel, a refusal's answer), from its `LinkFrame` message."""
    wire = frame.SerializeToString()
    return Outgoing(frame.id, (wire,), len(wire))


def pieces(frames: Sequence[Outgoing]) -> tuple[Sequence[bytes], int]:
    """The pieces of the one message that carries frames, in order, and its size: a lone frame as itself, several
    as a batch (a direct link sends them as they are, `mesh/link_conn.py`)."""
    if len(frames) == 1:
        return frames[0].pieces, frames[0].size
    parts: list[bytes] = []
    size = 0
    for frame in frames:
        head = _BATCH + varint(frame.size)
        parts += (head, *frame.pieces)
        size += len(head) + frame.size
    return parts, size


def pack(frames: Sequence[Outgoing]) -> bytes:
    """The one message that carries frames, as one buffer (`pieces` joined)."""
    parts = frames[0].pieces if len(frames) == 1 else pieces(frames)[0]
    return parts[0] if len(parts) == 1 else b"".join(parts)


@dataclass(slots=True)
class Frame:
    """A frame received: its id and kind ("call", "answer", "cancel", or None for none), and the fields of that
    kind (a call's request, metadata and timeout; an answer's code, message, response and trailers)."""

    id: int
    kind: str | None
    request: bytes | memoryview = b""
    """A call's request: a large one (read by hand) is a view of the message received."""
    metadata: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 0.0
    code: int = 0
    message: str = ""
    response: bytes = b""
    trailing: tuple[tuple[str, str | bytes], ...] = ()


def read_varint(data: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it), or (-1, pos) if no complete varint of at most _MAX_VARINT bytes is there."""
    if pos < end and data[pos] < 0x80:  # most of them: tags, small lengths and ids
        return data[pos], pos + 1
    value = shift = 0
    for i in range(pos, min(end, pos + _MAX_VARINT)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return -1, pos


def lacks(data: bytes | bytearray | memoryview, pos: int, end: int, number: int) -> bool:
    """Whether data[pos:end] is whole fields, none of them field number (then protobuf keeps the value read
    before it). False for anything it cannot walk (a group, a cut field): protobuf then reads the whole message."""
    while pos < end:
        tag = data[pos]  # one-byte tags and lengths (field numbers up to 15, fields under 128 bytes) inline
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = read_varint(data, pos, end)
            if tag < 0:
                return False
        if tag >> 3 == number:
            return False
        kind = tag & 7
        if kind == 0:
            _, after = read_varint(data, pos, end)
            if after == pos:
                return False
            pos = after
        elif kind == 2:
            if pos < end and data[pos] < 0x80:
                pos += 1 + data[pos]
            else:
                size, start = read_varint(data, pos, end)
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


def _of_message(message: Any) -> Frame:
    """A frame from protobuf's reading of it."""
    kind = message.WhichOneof("body")
    if kind == "call":
        call = message.call
        return Frame(message.id, kind, call.request, tuple([(h.key, h.value) for h in call.metadata]),
                     call.timeout_s)
    if kind == "answer":
        answer = message.answer
        trailing: list[tuple[str, str | bytes]] = [(h.key, h.value) for h in answer.trailers]
        trailing += [(h.key, h.value) for h in answer.binary_trailers]
        return Frame(message.id, kind, code=answer.code, message=answer.message, response=answer.response,
                     trailing=tuple(trailing))
    return Frame(message.id, kind)


def frames_of(message: Any) -> list[Frame]:
    """The frames a `LinkFrame` message carries: its batch, or itself (a batch's frames' own batches are not
    read: a frame is one call, one answer or one cancel)."""
    batch = message.batch
    return [_of_message(f) for f in batch] if batch else [_of_message(message)]


def _answer(frame_id: int, data: bytes | bytearray | memoryview, view: memoryview, pos: int, end: int) -> Frame | None:
    """An answer body at data[pos:end] that carries only a response (an OK answer), or None."""
    if pos == end:
        return Frame(frame_id, "answer")
    if data[pos] != _RESPONSE:
        return None
    size, start = read_varint(data, pos + 1, end)
    if size < 0 or start + size != end:
        return None
    return Frame(frame_id, "answer", response=bytes(view[start:end]))


def _call(frame_id: int, data: bytes | bytearray | memoryview, view: memoryview, pos: int, end: int) -> Frame | None:
    """A call body at data[pos:end] whose request is its first field and large: the request as a view, the rest
    of the call (metadata, timeout) read by protobuf; else None."""
    if data[pos] != _REQUEST:
        return None
    size, start = read_varint(data, pos + 1, end)
    stop = start + size
    if size < BY_HAND or stop > end or not lacks(data, stop, end, 1):
        return None
    rest = agent_pb2.LinkCall.FromString(_buffer(data[stop:end]))
    return Frame(frame_id, "call", view[start:stop], tuple([(h.key, h.value) for h in rest.metadata]),
                 rest.timeout_s)


def _fast(data: bytes | bytearray | memoryview, view: memoryview, pos: int, end: int) -> Frame | None:
    """The frame at data[pos:end] if it is an id, then an answer that carries only its response or a call with
    a large request, read by hand; else None (protobuf reads it)."""
    frame_id, at = 0, pos
    if at < end and data[at] == _ID:
        frame_id, at = read_varint(data, at + 1, end)
        if frame_id < 0:
            return None
    if at < end:
        tag = data[at]
        if tag in (_ANSWER, _CALL):
            size, start = read_varint(data, at + 1, end)
            if size >= 0 and start + size == end:
                if tag == _ANSWER:
                    return _answer(frame_id, data, view, start, end)
                if start < end:
                    return _call(frame_id, data, view, start, end)
    return None


def _buffer(data: bytes | bytearray | memoryview) -> bytes:
    """data for protobuf's parser, which reads any buffer (its stubs say bytes): not copied."""
    return cast(bytes, data)


def read(data: bytes | bytearray | memoryview) -> list[Frame]:
    """The frames a Link message carries (its batch, or itself), as protobuf reads them. Raises DecodeError if
    it is not a `LinkFrame`. (A direct link hands over a large message in the buffer TLS decrypted it into.)"""
    end = len(data)
    view = memoryview(data)
    if end and data[0] == _BATCH[0]:
        frames: list[Frame] = []
        pos = 0
        while pos < end and data[pos] == _BATCH[0]:
            size, start = read_varint(data, pos + 1, end)
            stop = start + size
            if size < 0 or stop > end:
                break  # a cut frame: protobuf reads (and refuses) the whole message
            frame = _fast(data, view, start, stop)
            if frame is None:
                if not frames:
                    break  # small calls (or anything else) from the first frame on: protobuf reads the whole message
                frame = _of_message(agent_pb2.LinkFrame.FromString(_buffer(data[start:stop])))  # protobuf reads it
            frames.append(frame)
            pos = stop
        if pos == end:
            return frames
    elif end:
        frame = _fast(data, view, 0, end)
        if frame is not None:
            return [frame]
    return frames_of(agent_pb2.LinkFrame.FromString(_buffer(data)))


__all__ = [
    "BY_HAND", "DecodeError", "Frame", "Outgoing", "answer_frame", "call_frame", "frames_of", "lacks", "message_frame",
    "pack", "pieces", "read", "read_varint", "varint",
]
