"""A Link's frames as wire bytes (`mesh/link_wire.py`): written as protobuf writes them, read as protobuf reads them.

The reader's fast paths are checked against protobuf on every kind of message: the frames hivemesh writes, any
`LinkFrame` protobuf writes, and messages built field by field in any order, with fields repeated, unknown fields
and broken lengths (each either read exactly as protobuf reads it, or refused as protobuf refuses it).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivemesh.mesh import link_wire
from hivemesh.mesh.link_wire import (
    BY_HAND,
    Frame,
    answer_frame,
    call_frame,
    frames_of,
    message_frame,
    pack,
    read,
    read_varint,
    varint,
)
from hivemesh.v1 import agent_pb2

_ids = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1))
_text = st.text(max_size=12)
_payload = st.one_of(st.binary(max_size=40), st.just(b""), st.binary(min_size=200, max_size=400),
                     st.tuples(st.integers(BY_HAND - 2, BY_HAND + 300), st.binary(min_size=1, max_size=3)).map(
                         lambda nb: (nb[1] * nb[0])[:nb[0]]))
"""Payloads on both sides of BY_HAND (written by protobuf below it, by hand from it on)."""
_headers = st.lists(st.tuples(_text, _text), max_size=3)
_timeouts = st.one_of(st.just(0.0), st.floats(allow_nan=False, allow_infinity=False))


def _call_message(call_id: int, request: bytes, headers: list[tuple[str, str]], timeout: float) -> Any:
    frame = agent_pb2.LinkFrame(id=call_id)
    frame.call.request = request
    frame.call.timeout_s = timeout
    for key, value in headers:
        frame.call.metadata.add(key=key, value=value)
    return frame


def _rest(headers: list[tuple[str, str]], timeout: float) -> Any:
    rest = agent_pb2.LinkCall(timeout_s=timeout)
    for key, value in headers:
        rest.metadata.add(key=key, value=value)
    return rest


def _answer_message(call_id: int, response: bytes) -> Any:
    frame = agent_pb2.LinkFrame(id=call_id)
    frame.answer.response = response
    return frame


@st.composite
def _frames(draw: st.DrawFn, depth: int = 0) -> Any:
    """Any LinkFrame protobuf can write: each kind, error answers with trailers, batches (nested once)."""
    kind = draw(st.sampled_from(["call", "answer", "error", "cancel", "none"] + (["batch"] if depth == 0 else [])))
    call_id = draw(_ids)
    if kind == "call":
        return _call_message(call_id, draw(_payload), draw(_headers), draw(_timeouts))
    if kind == "answer":
        return _answer_message(call_id, draw(_payload))
    if kind == "error":
        frame = agent_pb2.LinkFrame(id=call_id)
        frame.answer.code = draw(st.integers(-(2**31), 2**31 - 1))
        frame.answer.message = draw(_text)
        for key, value in draw(_headers):
            frame.answer.trailers.add(key=key, value=value)
        for key, raw in draw(st.lists(st.tuples(_text, st.binary(max_size=8)), max_size=2)):
            frame.answer.binary_trailers.add(key=key, value=raw)
        return frame
    if kind == "cancel":
        return agent_pb2.LinkFrame(id=call_id, cancel=draw(st.booleans()))
    if kind == "none":
        return agent_pb2.LinkFrame(id=call_id)
    frame = agent_pb2.LinkFrame(id=draw(st.integers(0, 5)))
    for inner in draw(st.lists(_frames(depth + 1), min_size=1, max_size=4)):
        frame.batch.add().CopyFrom(inner)
    return frame


def _protobuf_reads(data: bytes) -> list[Frame] | type[DecodeError]:
    try:
        return frames_of(agent_pb2.LinkFrame.FromString(data))
    except DecodeError:
        return DecodeError


def _we_read(data: bytes) -> list[Frame] | type[DecodeError]:
    try:
        return read(data)
    except DecodeError:
        return DecodeError


@settings(max_examples=300, deadline=None)
@given(_ids, _payload, _headers, _timeouts)
def test_a_call_frame_is_what_protobuf_writes_and_reads_back_as_protobuf_reads_it(
    call_id: int, request: bytes, headers: list[tuple[str, str]], timeout: float
) -> None:
    written = pack([call_frame(call_id, request, _rest(headers, timeout))])
    assert written == _call_message(call_id, request, headers, timeout).SerializeToString()
    assert read(written) == _protobuf_reads(written)
    [frame] = read(written)
    assert (frame.id, frame.kind, frame.request, list(frame.metadata)) == (call_id, "call", request, headers)
    assert struct.pack("<d", frame.timeout_s) == struct.pack("<d", timeout)  # -0.0 stays -0.0


@settings(max_examples=200, deadline=None)
@given(_ids, _payload)
def test_an_answer_frame_is_what_protobuf_writes_and_reads_back_as_protobuf_reads_it(
    call_id: int, response: bytes
) -> None:
    written = pack([answer_frame(call_id, response)])
    assert written == _answer_message(call_id, response).SerializeToString()
    assert read(written) == _protobuf_reads(written) == [Frame(call_id, "answer", response=response)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frames(1), min_size=1, max_size=6))
def test_a_batch_is_what_protobuf_writes_and_reads_back_frame_by_frame(messages: list[Any]) -> None:
    outgoing = [message_frame(m) for m in messages]
    written = pack(outgoing)
    expected = messages[0] if len(messages) == 1 else agent_pb2.LinkFrame(batch=messages)
    assert written == expected.SerializeToString()
    assert read(written) == _protobuf_reads(written)
    assert len(read(written)) == len(messages)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_frames())
def test_any_frame_protobuf_writes_is_read_as_protobuf_reads_it(message: Any) -> None:
    data = message.SerializeToString()
    assert read(data) == _protobuf_reads(data)


def _field(number: int, wire_type: int, body: bytes) -> bytes:
    return varint(number << 3 | wire_type) + body


def _len_field(number: int, body: bytes) -> bytes:
    return _field(number, 2, varint(len(body)) + body)


def _header(number: int) -> st.SearchStrategy[bytes]:
    """A LinkHeader (key, value) as field `number` of its message."""
    return st.tuples(_text, _text).map(
        lambda kv: _len_field(number, _len_field(1, kv[0].encode()) + _len_field(2, kv[1].encode())))


def _fields(*kinds: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A message's fields drawn from kinds in any order and number, with unknown fields among them."""
    unknown = st.binary(max_size=4).map(lambda b: _len_field(9, b))
    return st.lists(st.one_of(*kinds, unknown), max_size=5).map(b"".join)


_call_body = _fields(  # LinkCall: request, metadata, timeout
    st.binary(max_size=6).map(lambda b: _len_field(1, b)),
    _header(2),
    st.floats(allow_nan=False).map(lambda t: _field(3, 1, struct.pack("<d", t))),
)
_answer_body = _fields(  # LinkAnswer: code, message, response, trailers
    st.integers(0, 2**32).map(lambda c: _field(1, 0, varint(c))),
    _text.map(lambda t: _len_field(2, t.encode())),
    st.binary(max_size=6).map(lambda b: _len_field(3, b)),
    _header(4),
)


@st.composite
def _raw_frame(draw: st.DrawFn, depth: int = 0) -> bytes:
    """A LinkFrame's fields in any order and number: ids (some as over-long varints), calls, answers, cancels,
    batches, unknown fields."""
    choices = [
        st.integers(0, 2**64 - 1).map(lambda i: _field(1, 0, varint(i))),
        st.just(_field(1, 0, b"\x81\x80\x80\x80\x80\x80\x80\x80\x80\x00")),  # a 10-byte varint for 1
        _call_body.map(lambda b: _len_field(2, b)),
        st.binary(max_size=6).map(lambda b: _len_field(3, _len_field(3, b))),
        _answer_body.map(lambda b: _len_field(3, b)),
        st.booleans().map(lambda c: _field(4, 0, varint(int(c)))),
        st.binary(max_size=4).map(lambda b: _len_field(12, b)),
    ]
    if depth == 0:
        choices.append(_raw_frame(1).map(lambda f: _len_field(5, f)))
    return b"".join(draw(st.lists(st.one_of(*choices), max_size=5)))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_raw_frame())
def test_a_message_in_any_field_order_and_repetition_is_read_as_protobuf_reads_it(data: bytes) -> None:
    assert _we_read(data) == _protobuf_reads(data)


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=60))
def test_any_bytes_are_read_as_protobuf_reads_them_or_refused_as_it_refuses_them(data: bytes) -> None:
    assert _we_read(data) == _protobuf_reads(data)


@settings(max_examples=300, deadline=None)
@given(_raw_frame(), st.integers(0, 200))
def test_a_cut_message_is_read_or_refused_as_protobuf_does(data: bytes, cut: int) -> None:
    assert _we_read(data[:cut]) == _protobuf_reads(data[:cut])


_large = st.tuples(st.integers(BY_HAND - 2, BY_HAND + 40), st.binary(min_size=1, max_size=2)).map(
    lambda nb: (nb[1] * nb[0])[:nb[0]])
_large_call_body = st.lists(st.one_of(  # LinkCall with large requests among its fields, in any order and number
    _large.map(lambda b: _len_field(1, b)),
    st.binary(max_size=6).map(lambda b: _len_field(1, b)),
    _header(2),
    st.floats(allow_nan=False).map(lambda t: _field(3, 1, struct.pack("<d", t))),
    st.binary(max_size=4).map(lambda b: _len_field(9, b)),
), min_size=1, max_size=4).map(b"".join)


@st.composite
def _large_call_frames(draw: st.DrawFn) -> bytes:
    """Frames carrying large calls, alone or batched with any other frames, with ids, fields after the call and
    frames repeated, in any order."""
    def one() -> st.SearchStrategy[bytes]:
        return st.tuples(st.one_of(st.just(b""), st.integers(0, 2**64 - 1).map(lambda i: _field(1, 0, varint(i)))),
                         _large_call_body.map(lambda b: _len_field(2, b)),
                         st.one_of(st.just(b""), _raw_frame(1))).map(b"".join)
    frames = draw(st.lists(st.one_of(one(), _raw_frame(1)), min_size=1, max_size=3))
    if draw(st.booleans()):
        return frames[0]
    return b"".join(_len_field(5, f) for f in frames)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_large_call_frames(), st.one_of(st.none(), st.integers(0, BY_HAND + 200)))
def test_a_large_call_in_any_shape_is_read_as_protobuf_reads_it(data: bytes, cut: int | None) -> None:
    """The hand reader's calls (a large request first, then only other fields) against protobuf on messages
    where the request is repeated, follows other fields, or the frame or batch is cut anywhere."""
    if cut is not None:
        data = data[:cut]
    assert _we_read(data) == _protobuf_reads(data)


def test_a_call_with_more_than_one_request_is_read_as_protobuf_reads_it() -> None:
    """protobuf keeps a field's last value: a large request followed by another request field (large or small)
    is protobuf's to read; metadata, a timeout or an unknown field after it are not."""
    big, other = b"a" * BY_HAND, b"b" * (BY_HAND + 1)
    after = (_len_field(1, b"small"), _len_field(1, other), _len_field(2, _len_field(1, b"k") + _len_field(2, b"v")),
             _field(3, 1, struct.pack("<d", 2.5)), _len_field(9, b"?"))
    for extra in after:
        body = _len_field(1, big) + extra
        for data in (_field(1, 0, varint(7)) + _len_field(2, body), _len_field(5, _len_field(2, body))):
            ours, theirs = read(data), _protobuf_reads(data)
            assert ours == theirs, (extra, data)
            assert isinstance(theirs, list) and bytes(ours[0].request) == theirs[0].request


def test_an_answer_with_more_than_its_response_is_read_as_protobuf_reads_it() -> None:
    """The hand reader takes an answer that is one response field: anything after it (a code, a second
    response, trailers, an unknown field) is protobuf's to read, alone or in a batch."""
    after = (_field(1, 0, varint(5)), _len_field(3, b"second"),
             _len_field(4, _len_field(1, b"k") + _len_field(2, b"v")), _len_field(9, b"?"))
    for extra in after:
        body = _len_field(3, b"first") + extra
        for data in (_field(1, 0, varint(7)) + _len_field(3, body), _len_field(5, _len_field(3, body))):
            assert read(data) == _protobuf_reads(data), (extra, data)


def test_large_frames_and_batches_are_written_by_hand_and_ok_answers_read_by_hand(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of the module: a large payload is not copied through a protobuf message on the way out (the
    frame's pieces hold the payload object itself), and OK answers, alone or batched, are read by slicing their
    response out; calls and anything else go to protobuf whole."""
    big = b"x" * 65536
    call = call_frame(1, big, _rest([("authorization", "Bearer t")], 5.0))
    answer = answer_frame(2, big)
    assert any(piece is big for piece in call.pieces) and any(piece is big for piece in answer.pieces)
    small = answer_frame(3, b"small")
    assert len(small.pieces) == 1  # below BY_HAND: protobuf's own bytes

    parsed: list[Any] = []
    of_message = link_wire._of_message  # every frame protobuf reads becomes a Frame here

    def counted(message: Any) -> Frame:
        parsed.append(message)
        return of_message(message)

    monkeypatch.setattr(link_wire, "_of_message", counted)
    assert [(f.id, f.response) for f in read(pack([answer, small, answer_frame(4, b"")]))] == [
        (2, big), (3, b"small"), (4, b"")]
    assert [f.id for f in read(pack([answer]))] == [2] and parsed == []
    data = pack([call, answer])
    [got, _] = read(data)  # a large call's request: a view of the message, its metadata read by protobuf
    assert isinstance(got.request, memoryview) and got.request.obj is data and got.request == big
    assert got.metadata == (("authorization", "Bearer t"),) and got.timeout_s == 5.0 and parsed == []
    small_call = call_frame(6, b"{}", _rest([], 1.0))
    error = agent_pb2.LinkFrame(id=5)
    error.answer.code = 5
    read_back = read(pack([answer, message_frame(error), small_call]))  # after a frame read by hand: one by one
    assert [f.code for f in read_back] == [0, 5, 0] and read_back[2].request == b"{}" and len(parsed) == 2
    read_back = read(pack([small_call, answer]))  # from the first frame on: protobuf reads the whole message
    assert [f.id for f in read_back] == [6, 2] and len(parsed) == 4


def test_a_message_that_is_not_a_link_frame_is_refused() -> None:
    for data in (b"\x12\x05\x0a", b"\x08", b"\x2a\x09\x12\x01", b"\xff\xff\xff"):
        with pytest.raises(DecodeError):
            read(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(0, 2**7), st.integers(2**7 - 2, 2**14 + 2), st.integers(2**14 - 2, 2**21 + 2),
                 st.integers(0, 2**64 - 1), st.sampled_from([0, 127, 128, 2**14 - 1, 2**14, 2**21 - 1, 2**21])))
def test_varint_is_protobuf_s(value: int) -> None:
    """Each of varint's shapes (one byte, two, three, and the loop beyond 2 MiB) is protobuf's encoding, and
    read_varint reads each back (its one-byte shortcut included; from 2**63 on, ten bytes, protobuf reads them),
    and none that is cut short."""
    message = agent_pb2.LinkFrame(id=value)
    assert b"\x08" + varint(value) == message.SerializeToString() or value == 0
    data = b"\x00" + varint(value) + b"\x01"
    assert read_varint(data, 1, len(data)) == ((value, len(data) - 1) if value < 2**63 else (-1, 1))
    assert read_varint(data, 1, len(data) - 2) == (-1, 1)  # its last byte cut off
