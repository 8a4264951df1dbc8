"""`mesh/invoke_wire.py`: requests and responses written around their payload are protobuf's bytes exactly, and
a response is read as protobuf reads it, whatever the bytes."""

from __future__ import annotations

import itertools
from typing import Any

from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivemesh.mesh import invoke_wire
from hivemesh.mesh.invoke_wire import BY_HAND
from hivemesh.v1 import agent_pb2

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_sizes = st.one_of(st.integers(0, 64), st.integers(BY_HAND - 2, BY_HAND + 2), st.integers(BY_HAND, 3 * BY_HAND))


@st.composite
def _payload(draw: Any) -> bytes:
    """A payload of any size around BY_HAND: a drawn head, then filler (drawing 40 KiB byte by byte is slow)."""
    head = draw(st.binary(max_size=8))
    size = draw(_sizes)
    return (head + bytes([draw(st.integers(0, 255))]) * size)[:max(size, 0)] if size else head


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """data cut into pieces at the given points (a JSON text comes as a few: braces, key, the long field)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)] or [b""]


_hops = st.lists(st.builds(agent_pb2.Hop, kind=st.sampled_from(["agent", "sidecar"]), identity=st.text(max_size=20),
                           instance=st.text(max_size=8), endpoint=st.text(max_size=12)), max_size=2)
_usage = st.one_of(st.none(), st.builds(agent_pb2.Usage, input_tokens=st.integers(0, 2**40),
                                        output_tokens=st.integers(-5, 2**40), model=st.text(max_size=6)))


@st.composite
def _response_rest(draw: Any) -> agent_pb2.InvokeResponse:
    rest = agent_pb2.InvokeResponse(content_type=draw(st.sampled_from(["", "application/json", "text/plain"])),
                                    state=draw(st.sampled_from([0, 1, 2, 3])), hops=draw(_hops),
                                    signature=draw(st.text(max_size=10)))
    usage = draw(_usage)
    if usage is not None:
        rest.usage.CopyFrom(usage)
    for key, value in draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=1)).items():
        rest.metadata[key] = value
    return rest


@_SETTINGS
@given(_payload(), st.lists(st.integers(0, 2**20), max_size=3), _response_rest())
def test_a_response_is_protobuf_s_bytes(output: bytes, cuts: list[int], rest: agent_pb2.InvokeResponse) -> None:
    whole = agent_pb2.InvokeResponse()
    whole.CopyFrom(rest)
    whole.output = output
    assert invoke_wire.response(_pieces(output, cuts), rest) == whole.SerializeToString()


@_SETTINGS
@given(st.text(max_size=12), _payload(), st.lists(st.integers(0, 2**20), max_size=3),
       st.text(max_size=10), st.text(max_size=8), st.integers(-(2**40), 2**40))
def test_a_request_is_protobuf_s_bytes(
    capability: str, data: bytes, cuts: list[int], call_id: str, content_type: str, queue_for_ms: int
) -> None:
    rest = agent_pb2.InvokeRequest(content_type=content_type, queue_for_ms=queue_for_ms)
    rest.context.call_id = call_id
    whole = agent_pb2.InvokeRequest()
    whole.CopyFrom(rest)
    whole.capability, whole.input = capability, data
    assert invoke_wire.request(capability, _pieces(data, cuts), rest) == whole.SerializeToString()


def _read(raw: bytes | memoryview, kind: Any = agent_pb2.InvokeResponse) -> tuple[str, Any]:
    """What invoke_wire reads in raw (a response, or kind InvokeRequest), as the message protobuf would read:
    ("message", it) or ("error", None) (messages compared as messages: a map's entries may serialize in another
    order)."""
    request = kind is agent_pb2.InvokeRequest
    try:
        message, payload = (invoke_wire.read_request if request else invoke_wire.read_response)(raw)
    except DecodeError:
        return "error", None
    whole = kind()
    whole.CopyFrom(message)
    setattr(whole, "input" if request else "output", bytes(payload))
    return "message", whole


def _protobuf(raw: bytes, kind: Any = agent_pb2.InvokeResponse) -> tuple[str, Any]:
    try:
        return "message", kind.FromString(raw)
    except DecodeError:
        return "error", None


def _changed(raw: bytes, change: str, at: int, junk: bytes) -> bytes:
    """raw cut short at `at`, with the byte there changed, or with junk after it (as written for "whole")."""
    where = at % (len(raw) + 1)
    if change == "cut":
        return raw[:where]
    if change == "flip" and raw:
        where = min(where, len(raw) - 1)
        return raw[:where] + bytes([raw[where] ^ 0x5A]) + raw[where + 1:]
    if change == "append":
        return raw + junk
    return raw


@_SETTINGS
@given(_payload(), _response_rest(), st.lists(st.tuples(_payload(), _response_rest()), max_size=2),
       st.integers(0, 2**20), st.sampled_from(["whole", "cut", "flip", "append"]), st.binary(max_size=6))
def test_a_response_is_read_as_protobuf_reads_it(
    output: bytes, rest: agent_pb2.InvokeResponse, more: list[tuple[bytes, agent_pb2.InvokeResponse]], at: int,
    change: str, junk: bytes,
) -> None:
    """Answers as written, several concatenated (protobuf keeps the last output, merges the rest), cut short,
    with a byte changed, or with any bytes after them."""
    raw = invoke_wire.response([output], rest)
    for extra_output, extra_rest in more:
        raw += invoke_wire.response([extra_output], extra_rest)
    raw = _changed(raw, change, at, junk)
    assert _read(raw) == _protobuf(raw)


def test_a_large_output_is_a_view_of_the_bytes_received() -> None:
    """The point of the module: the output is not copied out (else it should not exist), and a later output
    field, which protobuf would keep instead, sends the answer to protobuf."""
    rest = agent_pb2.InvokeResponse(content_type="application/json", state=agent_pb2.TASK_STATE_COMPLETED)
    raw = invoke_wire.response([b'{"text":"', b"x" * BY_HAND, b'"}'], rest)
    message, output = invoke_wire.read_response(raw)
    assert isinstance(output, memoryview) and output.obj is raw
    assert message.content_type == "application/json" and message.output == b""
    later = raw + agent_pb2.InvokeResponse(output=b"later").SerializeToString()
    message, output = invoke_wire.read_response(later)
    assert bytes(output) == b"later" == message.output


@st.composite
def _request_rest(draw: Any) -> agent_pb2.InvokeRequest:
    rest = agent_pb2.InvokeRequest(content_type=draw(st.text(max_size=6)), queue_for_ms=draw(st.integers(-5, 2**40)))
    rest.context.call_id = draw(st.text(max_size=6))
    for key, value in draw(st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4)), max_size=2)):
        rest.metadata[key] = value
    return rest


@_SETTINGS
@given(st.text(max_size=8), _payload(), _request_rest(),
       st.lists(st.tuples(st.text(max_size=8), _payload(), _request_rest()), max_size=2),
       st.integers(0, 2**20), st.sampled_from(["whole", "cut", "flip", "append", "view"]), st.binary(max_size=6))
def test_a_request_is_read_as_protobuf_reads_it(
    capability: str, data: bytes, rest: agent_pb2.InvokeRequest,
    more: list[tuple[str, bytes, agent_pb2.InvokeRequest]], at: int, change: str, junk: bytes,
) -> None:
    """Requests as written, several concatenated (protobuf keeps the last capability and input), cut short, with
    a byte changed, with any bytes after them, or given as a view (a Link call's request)."""
    raw = invoke_wire.request(capability, [data], rest)
    for extra_capability, extra_data, extra_rest in more:
        raw += invoke_wire.request(extra_capability, [extra_data], extra_rest)
    raw = _changed(raw, change, at, junk)
    given_raw: bytes | memoryview = memoryview(b"?" + raw)[1:] if change == "view" else raw
    assert _read(given_raw, agent_pb2.InvokeRequest) == _protobuf(raw, agent_pb2.InvokeRequest)


def test_a_large_input_is_a_view_of_the_bytes_received() -> None:
    """The input is not copied out, it is left unset in the message (the chain reads it from `Inbound.input`),
    and a second input field, which protobuf would keep instead, sends the request to protobuf."""
    rest = agent_pb2.InvokeRequest(content_type="application/json")
    raw = invoke_wire.request("echo", [b'{"text":"', b"x" * BY_HAND, b'"}'], rest)
    message, data = invoke_wire.read_request(raw)
    assert isinstance(data, memoryview) and data.obj is raw and len(data) == BY_HAND + 11
    assert message.capability == "echo" and message.content_type == "application/json" and message.input == b""
    later = raw + agent_pb2.InvokeRequest(input=b"later").SerializeToString()
    message, data = invoke_wire.read_request(later)
    assert bytes(data) == b"later" == message.input
    assert invoke_wire.parse_request(raw) == agent_pb2.InvokeRequest.FromString(raw)  # whole, for gRPC


def test_an_explicit_empty_output_later_on_wins_as_in_protobuf() -> None:
    raw = invoke_wire.response([b"y" * BY_HAND], agent_pb2.InvokeResponse()) + b"\x0a\x00"
    assert bytes(invoke_wire.read_response(raw)[1]) == b"" == agent_pb2.InvokeResponse.FromString(raw).output


def test_an_answer_is_read_for_its_fields_beside_the_payload() -> None:
    """What observers (metrics, budgets, tracing) read of an answer in bytes: a chunk whole; a response's usage
    and state, its large output left in the bytes."""
    usage = agent_pb2.Usage(input_tokens=3, output_tokens=4, model="m")
    raw = invoke_wire.response([b"z" * BY_HAND], agent_pb2.InvokeResponse(state=2, usage=usage))
    read = invoke_wire.answer("Invoke", raw)
    assert isinstance(read, agent_pb2.InvokeResponse)
    assert read.usage == usage and read.state == 2 and read.output == b""
    chunk = agent_pb2.InvokeChunk(data=b"z" * BY_HAND, final=True, usage=usage)
    assert invoke_wire.answer("InvokeStream", chunk.SerializeToString()) == chunk


def test_encode_request_writes_protobuf_s_bytes_at_every_size() -> None:
    """The outbound edge's encoder (callers other than MeshClient) writes through invoke_wire too."""
    from hivemesh.mesh.outbound.call import encode_request

    ctx = agent_pb2.CallContext(call_id="c-1", idempotency_key="k")
    for payload in (b"", b'{"text":"x"}', b"y" * (BY_HAND + 5)):
        whole = agent_pb2.InvokeRequest(capability="echo", input=payload, content_type="application/json",
                                        metadata={"m": "1"})
        whole.context.CopyFrom(ctx)
        assert encode_request("echo", payload, context=ctx, metadata={"m": "1"}) == whole.SerializeToString()
