"""A Link's frames as wire bytes: written around their payload and read with one slice of it.

A frame's one large field is its call's request or its answer's response, and each trip through a protobuf
message copies it: set into a frame, serialized (the encoder's buffer, then bytes), packed into a batch (every
frame serialized and parsed again), read back, then taken out of the message. perf on `bench/peers.py`'s agent
at 64 KiB and 16 in flight: copying was 13% of its CPU, the largest single cost. Here a frame to send is the
pieces of its wire form, with the payload as it is, joined once per message (a batch is the same pieces, each
frame behind its length: protobuf's encoding of a repeated message field); a message received is read by
finding the payload's place and slicing it out once.

What this module writes is what protobuf writes (tested byte for byte). It reads by hand only the shapes it can
read exactly: a call frame whose request comes first (protobuf's own field order, so also other languages'
peers), an answer that carries only its response, a batch of such frames. The rest of a call (its metadata and
timeout) is parsed by protobuf, and any other message (another field order, a field twice, unknown fields, an
error answer) by protobuf whole, so a frame always means what protobuf reads in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf.message import DecodeError

from hivemesh.v1 import agent_pb2

_ID: Final = 0x08  # LinkFrame.id: field 1, varint
_CALL: Final = 0x12  # LinkFrame.call: field 2, length-delimited
_ANSWER: Final = 0x1A  # LinkFrame.answer: field 3, length-delimited
_BATCH: Final = b"\x2a"  # LinkFrame.batch: field 5, length-delimited
_REQUEST: Final = 0x0A  # LinkCall.request: field 1, length-delimited
_RESPONSE: Final = 0x1A  # LinkAnswer.response: field 3, length-delimited
_MAX_VARINT: Final = 9  # bytes of a varint read by hand (up to 2**63 - 1); a longer one goes to protobuf


def varint(value: int) -> bytes:
    """value (0 <= value < 2**64) as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL: Final = tuple(varint(n) for n in range(128))


def _varint(value: int) -> bytes:
    return _SMALL[value] if value < 128 else varint(value)


@dataclass(slots=True)
class Outgoing:
    """A frame to send: the pieces of its wire form (joined only when its message is written) and their size."""

    id: int
    pieces: tuple[bytes, ...]
    size: int


def _frame(call_id: int, tag: int, body: Sequence[bytes], body_size: int) -> Outgoing:
    head = (b"\x08" + _varint(call_id) if call_id else b"") + bytes((tag,)) + _varint(body_size)
    return Outgoing(call_id, (head, *body), len(head) + body_size)


def call_frame(call_id: int, request: bytes, rest: bytes = b"") -> Outgoing:
    """A call frame: request, then rest, the rest of its `LinkCall` serialized (metadata, timeout)."""
    if not request:
        return _frame(call_id, _CALL, (rest,), len(rest))
    field_head = b"\x0a" + _varint(len(request))
    return _frame(call_id, _CALL, (field_head, request, rest), len(field_head) + len(request) + len(rest))


def answer_frame(call_id: int, response: bytes) -> Outgoing:
    """The answer frame of a call that ended OK with this response."""
    if not response:
        return _frame(call_id, _ANSWER, (), 0)
    field_head = b"\x1a" + _varint(len(response))
    return _frame(call_id, _ANSWER, (field_head, response), len(field_head) + len(response))


def message_frame(frame: Any) -> Outgoing:
    """Any other frame (a cancel, a refusal's answer), from its `LinkFrame` message."""
    wire = frame.SerializeToString()
    return Outgoing(frame.id, (wire,), len(wire))


def pack(frames: Sequence[Outgoing]) -> bytes:
    """The one message that carries frames, in order: a lone frame as itself, several as a batch."""
    if len(frames) == 1:
        pieces = frames[0].pieces
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)
    parts: list[bytes] = []
    for frame in frames:
        parts += (_BATCH, _varint(frame.size), *frame.pieces)
    return b"".join(parts)


@dataclass(slots=True)
class Frame:
    """A frame received: its id and kind ("call", "answer", "cancel", or None for none), and the fields of that
    kind (a call's request, metadata and timeout; an answer's code, message, response and trailers)."""

    id: int
    kind: str | None
    request: bytes = b""
    metadata: list[tuple[str, str]] = field(default_factory=list)
    timeout_s: float = 0.0
    code: int = 0
    message: str = ""
    response: bytes = b""
    trailing: list[tuple[str, str | bytes]] = field(default_factory=list)


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it), or (-1, pos) if no complete varint of at most _MAX_VARINT bytes is there."""
    value = shift = 0
    for i in range(pos, min(end, pos + _MAX_VARINT)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return -1, pos


def _of_message(message: Any) -> Frame:
    """A frame from protobuf's reading of it."""
    kind = message.WhichOneof("body")
    if kind == "call":
        call = message.call
        return Frame(message.id, kind, call.request, [(h.key, h.value) for h in call.metadata], call.timeout_s)
    if kind == "answer":
        answer = message.answer
        trailing: list[tuple[str, str | bytes]] = [(h.key, h.value) for h in answer.trailers]
        trailing += [(h.key, h.value) for h in answer.binary_trailers]
        return Frame(message.id, kind, code=answer.code, message=answer.message, response=answer.response,
                     trailing=trailing)
    return Frame(message.id, kind)


def frames_of(message: Any) -> list[Frame]:
    """The frames a `LinkFrame` message carries: its batch, or itself (a batch's frames' own batches are not
    read: a frame is one call, one answer or one cancel)."""
    batch = message.batch
    return [_of_message(f) for f in batch] if batch else [_of_message(message)]


def _by_protobuf(data: bytes, start: int, end: int) -> Frame:
    return _of_message(agent_pb2.LinkFrame.FromString(data[start:end]))


def _call(frame_id: int, data: bytes, pos: int, end: int) -> Frame | None:
    """A call body at data[pos:end] whose request comes first, or None."""
    if pos == end:
        return Frame(frame_id, "call")
    if data[pos] != _REQUEST:
        return None
    size, start = _read_varint(data, pos + 1, end)
    stop = start + size
    if size < 0 or stop > end:
        return None
    if stop == end:
        return Frame(frame_id, "call", data[start:stop])
    rest = data[stop:end]
    call = agent_pb2.LinkCall.FromString(rest)
    # Protobuf keeps the last request in a message: exact only if the rest has none. Serializing what was read
    # never takes more bytes than were read, and drops an empty request field: equal sizes prove there was none.
    if call.request or call.ByteSize() != len(rest):
        return None
    return Frame(frame_id, "call", data[start:stop], [(h.key, h.value) for h in call.metadata], call.timeout_s)


def _answer(frame_id: int, data: bytes, pos: int, end: int) -> Frame | None:
    """An answer body at data[pos:end] that carries only a response (an OK answer), or None."""
    if pos == end:
        return Frame(frame_id, "answer")
    if data[pos] != _RESPONSE:
        return None
    size, start = _read_varint(data, pos + 1, end)
    if size < 0 or start + size != end:
        return None
    return Frame(frame_id, "answer", response=data[start:end])


def _fast(data: bytes, pos: int, end: int) -> Frame | None:
    """The frame at data[pos:end] if it is an id, then a call or an answer filling the rest, read by hand; else
    None (protobuf reads it)."""
    frame_id, at = 0, pos
    if at < end and data[at] == _ID:
        frame_id, at = _read_varint(data, at + 1, end)
        if frame_id < 0:
            return None
    if at < end and data[at] in (_CALL, _ANSWER):
        size, start = _read_varint(data, at + 1, end)
        if size >= 0 and start + size == end:
            return (_call if data[at] == _CALL else _answer)(frame_id, data, start, end)
    return None


def read(data: bytes) -> list[Frame]:
    """The frames a Link message carries (its batch, or itself), as protobuf reads them. Raises DecodeError if
    it is not a `LinkFrame`."""
    end = len(data)
    if end and data[0] == _BATCH[0]:
        frames: list[Frame] = []
        pos = 0
        while pos < end and data[pos] == _BATCH[0]:
            size, start = _read_varint(data, pos + 1, end)
            if size < 0 or start + size > end:
                break
            stop = start + size
            frames.append(_fast(data, start, stop) or _by_protobuf(data, start, stop))
            pos = stop
        if pos == end:
            return frames
    elif end:
        frame = _fast(data, 0, end)
        if frame is not None:
            return [frame]
    return frames_of(agent_pb2.LinkFrame.FromString(data))


def read_all(messages: Iterable[bytes]) -> list[Frame]:
    """The frames of several messages, in order."""
    return [frame for message in messages for frame in read(message)]


__all__ = [
    "DecodeError", "Frame", "Outgoing", "answer_frame", "call_frame", "frames_of", "message_frame", "pack", "read",
    "read_all", "varint",
]
