"""The output screen (hivemesh.mesh.layers.output_screen): its patterns, Luhn, and refuse/redact/record on
answers as messages (the SDK) and as bytes (the sidecar)."""

from __future__ import annotations

import json

import pytest

from hivemesh.mesh.errors import OutputScreenedError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.layers.output_screen import (
    NOTE,
    PatternClassifier,
    Span,
    luhn_ok,
    output_screen_layer,
)
from hivemesh.v1 import agent_pb2

FAKE_KEY = "sk-proj-" + "a1B2c3D4e5F6g7H8i9J0kLmN"
SECRETS = {
    "api-key": [FAKE_KEY, "AKIAIOSFODNN7EXAMPLE", "ghp_" + "x" * 36, "xoxb-1234567890-abcdef"],
    "private-key": ["-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI\n-----END EC PRIVATE KEY-----",
                    "-----BEGIN PRIVATE KEY-----"],
    "email": ["jane.doe@example.co.uk", "a+b@mail.example.com"],
    "phone": ["+1 415 555 0134", "(020) 7946 0958", "+44 20 7946 0958", "415-555-0134"],
    "card-number": ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"],
}
CLEAN = ["order 4111 1111 1111 1112 shipped", "version 1.2.3", "call at 10:30", "id 2024-01-15",
         "total 1234567", "sk-short", "user@localhost", "ISBN 978-3-16-148410-0"]


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_patterns_find_secrets_and_pass_ordinary_text() -> None:
    classify = PatternClassifier()
    for rule, samples in SECRETS.items():
        for sample in samples:
            spans = classify(f"here: {sample} (end)")
            assert [s.rule for s in spans] == [rule], sample
            assert f"here: {sample} (end)"[spans[0].start:spans[0].end].strip() == sample.strip()
    for text in CLEAN:
        assert classify(text) == [], text


def _call(capability: str, method: str = "Invoke") -> Inbound:
    return Inbound(method=method, request=agent_pb2.InvokeRequest(capability=capability), wire_size=0,
                   metadata={}, auth_context={})


def _caps() -> list[agent_pb2.Capability]:
    return [agent_pb2.Capability(name="refuse", output_screen=agent_pb2.OUTPUT_SCREEN_REFUSE),
            agent_pb2.Capability(name="redact", output_screen=agent_pb2.OUTPUT_SCREEN_REDACT),
            agent_pb2.Capability(name="record", output_screen=agent_pb2.OUTPUT_SCREEN_RECORD),
            agent_pb2.Capability(name="plain")]


def test_refuse_redact_record_on_messages_and_bytes() -> None:
    assert output_screen_layer([agent_pb2.Capability(name="plain")]) is None  # nothing declared: no layer
    layer = output_screen_layer(_caps())
    assert layer is not None
    answer = {"reply": f"use {FAKE_KEY} or mail ops@example.com", "n": 3, "tags": ["4111111111111111"]}
    resp = agent_pb2.InvokeResponse(output=json.dumps(answer).encode(), content_type="application/json")

    call = _call("refuse")
    with pytest.raises(OutputScreenedError, match="api-key, card-number, email") as refused:
        layer.answer(call, resp)
    assert refused.value.reason == "OUTPUT_SCREENED" and FAKE_KEY not in refused.value.message
    assert call.notes[NOTE] == {"action": "refuse", "rules": ["api-key", "card-number", "email"], "count": 3}

    for sent in (resp, resp.SerializeToString()):  # the SDK's message, the sidecar's bytes
        call = _call("redact")
        out = layer.answer(call, sent)
        msg = agent_pb2.InvokeResponse.FromString(out) if isinstance(out, bytes) else out
        assert json.loads(msg.output) == {"reply": "use [REDACTED:api-key] or mail [REDACTED:email]", "n": 3,
                                          "tags": ["[REDACTED:card-number]"]}
        assert call.notes[NOTE]["action"] == "redact"

    call = _call("record")
    assert layer.answer(call, resp) is resp and call.notes[NOTE]["count"] == 3
    call = _call("plain")
    assert layer.answer(call, resp) is resp and NOTE not in call.notes

    # Streams: each chunk is screened; text answers as one text; clean answers pass untouched.
    chunk = agent_pb2.InvokeChunk(data=f"key {FAKE_KEY}".encode(), content_type="text/plain")
    out = layer.answer(_call("redact", "InvokeStream"), chunk.SerializeToString())
    assert agent_pb2.InvokeChunk.FromString(out).data == b"key [REDACTED:api-key]"
    clean = agent_pb2.InvokeResponse(output=b'{"ok": true}', content_type="application/json")
    assert layer.answer(_call("refuse"), clean) is clean


def test_a_pluggable_classifier() -> None:
    def secret_word(text: str) -> list[Span]:
        i = text.find("swordfish")
        return [Span("password", i, i + 9)] if i >= 0 else []

    layer = output_screen_layer(_caps(), secret_word)
    assert layer is not None
    resp = agent_pb2.InvokeResponse(output=b'"the password is swordfish"', content_type="application/json")
    out = layer.answer(_call("redact"), resp)
    assert json.loads(out.output) == "the password is [REDACTED:password]"


def _nested(value: object, levels: int) -> object:
    for _ in range(levels):
        value = [value]
    return value


def test_an_answer_nested_deeper_than_the_screen_reads_is_never_passed_on_unread() -> None:
    """A secret wrapped in 70 lists was returned unscreened (the walk stopped at 64 levels)."""
    layer = output_screen_layer(_caps())
    assert layer is not None
    answer = {"reply": "fine", "deep": _nested(f"key {FAKE_KEY}", 70)}
    resp = agent_pb2.InvokeResponse(output=json.dumps(answer).encode(), content_type="application/json")
    call = _call("refuse")
    with pytest.raises(OutputScreenedError, match="nested-too-deep"):
        layer.answer(call, resp)
    assert call.notes[NOTE]["rules"] == ["nested-too-deep"]
    out = layer.answer(_call("redact"), resp)
    redacted = json.loads(out.output)
    assert FAKE_KEY not in out.output.decode() and redacted["reply"] == "fine"
    assert json.dumps(redacted["deep"]).count("[REDACTED:nested-too-deep]") == 1
    shallow = {"deep": _nested(f"key {FAKE_KEY}", 60)}  # within reach: screened as any other string
    out = layer.answer(_call("redact"), agent_pb2.InvokeResponse(output=json.dumps(shallow).encode(),
                                                                 content_type="application/json"))
    assert "[REDACTED:api-key]" in out.output.decode() and "nested-too-deep" not in out.output.decode()
