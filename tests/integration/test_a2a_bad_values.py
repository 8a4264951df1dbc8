"""The A2A gateway given values JSON (or a protobuf Value) cannot carry: NaN, Infinity, numbers past a double, lone
surrogates; in a caller's text or data parts, and in an agent's answer. Each is refused -32602 before any run, sent
as plain text, or carried as JSON text: never -32603, never a traceback in the log."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from a2a.helpers import get_text_parts
from a2a.types import TaskState
from google.protobuf.json_format import MessageToDict

from hivemesh.sdk import Agent, AgentServer, capability
from hivemesh.sdk.a2a.executor import outcome_of
from hivemesh.sdk.a2a.tasks import A2A_CALL
from hivemesh.sdk.workflow import WorkflowState
from tests.integration import test_a2a_gateway as gateway_tests
from tests.integration.test_a2a_gateway import Rig, client_for
from tests.support.a2a_rig import send_request

pytestmark = pytest.mark.timeout(180)
rig = gateway_tests.rig  # the gateway tests' fixture: a mesh, its agents, the gateway, alice and bob

LONE = "\ud800"
HUGE = 10**400
"""A whole number JSON writes exactly, yet past any double: a protobuf Value (an A2A data part) cannot hold it."""
DEEP: Any = 1
for _ in range(60):
    DEEP = [DEEP]


class OddAgent(Agent):
    """Answers what an A2A part cannot hold as such: a lone surrogate, a number past a double."""

    name = "odd"

    @capability(description="An object holding a lone surrogate")
    async def surrogate(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"text": f"caf\u00e9 {LONE}", "ok": True}

    @capability(description="A string that is a lone surrogate")
    async def lone(self, req: dict[str, Any]) -> Any:  # no output schema: the SDK checks a str one strictly
        return "\udc00 alone"

    @capability(description="A number past a double")
    async def huge(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"n": HUGE}

    @capability(description="Lists nested past the 100 levels protobuf parses (about 2 per JSON level)")
    async def deep(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"deep": DEEP}

    @capability(description="Items an A2A part cannot hold as such, and one it can")
    async def oddities(self, req: dict[str, Any]) -> AsyncIterator[Any]:
        yield {"n": HUGE}
        yield LONE
        yield "fine"


@pytest.fixture
async def odd(rig: Rig) -> AsyncIterator[Rig]:
    """The gateway rig with the odd agent joined."""
    async with AgentServer(OddAgent(), await rig.env.settings_for("odd")):
        for cap in ("surrogate", "lone", "huge", "deep", "oddities"):
            assert await rig.gateway.mesh.node.registry.wait_for_capability(cap, 1, timeout=10)
        yield rig


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    traced = [f"{r.name}: {r.getMessage()[:200]}" for r in caplog.records if r.exc_info or r.exc_text]
    assert traced == [], traced


async def _post(http: httpx.AsyncClient, url: str, body: bytes, *, v1: bool = False) -> dict[str, Any]:
    """A raw JSON-RPC body (bytes: json would refuse to write NaN, Infinity or a lone surrogate as-is)."""
    r = await http.post(url, content=body, headers={"content-type": "application/json",
                                                      "A2A-Version": "1.0" if v1 else "0.3"})
    assert r.status_code == 200, r.text[:300]
    return r.json()  # type: ignore[no-any-return]


def _send(part: str, skill: str, *, v1: bool = False) -> bytes:
    """message/send (0.3) or SendMessage (1.0) of one part, written as raw JSON text."""
    if v1:
        return ('{"jsonrpc": "2.0", "id": 7, "method": "SendMessage", "params": {"message": {"role": "ROLE_USER", '
                f'"messageId": "m1", "parts": [{part}], "metadata": {{"skill": "{skill}"}}}}}}}}').encode()
    return ('{"jsonrpc": "2.0", "id": 7, "method": "message/send", "params": {"message": {"role": "user", '
            f'"messageId": "m1", "kind": "message", "parts": [{part}], "metadata": {{"skill": "{skill}"}}}}}}}}'
            ).encode()


async def test_a_text_part_that_is_not_strict_json_is_sent_as_text(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    async with await rig.http_for(rig.alice) as http:
        url = f"{rig.gateway.url}/agents/echo/"
        for text in ("NaN", "Infinity", "-Infinity", "1e999", '{"seconds": Infinity}', '{"x": [1, -1e400]}',
                     '{"x": NaN}'):
            got = await _post(http, url, _send(json.dumps({"kind": "text", "text": text}), "echo"))
            assert "result" in got, (text, got)
            status = got["result"]["status"]
            assert status["state"] == "completed", (text, status)
            # echo answers its input's "text": the whole text went as {"text": ...}
            assert got["result"]["artifacts"][0]["parts"][0]["data"]["text"] == text, got["result"]["artifacts"]
        # Strict JSON text is still read as JSON.
        got = await _post(http, url, _send(json.dumps({"kind": "text", "text": '{"text": "1e300"}'}), "echo"))
        assert got["result"]["artifacts"][0]["parts"][0]["data"]["text"] == "1e300"
    _no_traceback(caplog)


async def test_a_data_part_json_cannot_carry_is_refused_before_any_run(rig: Rig,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    engine = rig.gateway.executor.engine
    before = len(await engine.list())
    async with await rig.http_for(rig.alice) as http:
        url = f"{rig.gateway.url}/agents/echo/"
        for value, what in (("1e999", "number"), ("-1e999", "number"), ("NaN", "NaN"), ("Infinity", "Infinity"),
                            ("1" + "0" * 400, "number")):
            for v1 in (False, True):
                part = f'{{"data": {{"text": "x", "seconds": [1, {value}]}}}}' if v1 else \
                    f'{{"kind": "data", "data": {{"text": "x", "seconds": [1, {value}]}}}}'
                got = await _post(http, url, _send(part, "echo", v1=v1), v1=v1)
                err = got.get("error")
                assert err is not None and err["code"] == -32602, (value, v1, got)
                assert "parts[0].data.seconds[1]" in err["message"] and what in err["message"], err
                assert got["id"] == 7
        # A metadata value alike, though no part.
        body = _send('{"kind": "text", "text": "hi"}', "echo").replace(b'"skill": "echo"',
                                                                        b'"skill": "echo", "w": 1e999')
        err = (await _post(http, url, body))["error"]
        assert err["code"] == -32602 and "metadata.w" in err["message"], err
    assert len(await engine.list()) == before  # no run was started, so no mesh call
    _no_traceback(caplog)


async def test_a_lone_surrogate_in_a_part_is_refused_before_any_run(rig: Rig,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    engine = rig.gateway.executor.engine
    before = len(await engine.list())
    async with await rig.http_for(rig.alice) as http:
        url = f"{rig.gateway.url}/agents/echo/"
        cases = [
            # the text part's JSON holds one (the reviewer's case: the mesh call ran, the task failed -32603)
            (_send(json.dumps({"kind": "text", "text": '{"text": "\\ud800"}'}), "echo"), "parts[0].text", False),
            # the text itself is one (an escape in the request)
            (_send('{"kind": "text", "text": "a \\ud800 b"}', "echo"), "parts[0].text", False),
            # a data part holds one, as an escape or as the bytes UTF-8 has no place for (a2a-sdk failed on it)
            (_send('{"kind": "data", "data": {"text": "\\udfff"}}', "echo"), "parts[0].data.text", False),
            (_send('{"kind": "data", "data": {"text": "SUR"}}', "echo").replace(b"SUR", b"\xed\xa0\x80"),
             "parts[0].data.text", False),
            (_send('{"kind": "data", "data": {"\\ud800": 1}}', "echo"), "parts[0].data", False),
            (_send('{"data": {"text": "\\ud800"}}', "echo", v1=True), "parts[0].data.text", True),
            (_send('{"text": "\\ud800"}', "echo", v1=True), "parts[0].text", True),
            (_send(json.dumps({"text": '{"text": "\\udc00"}'}), "echo", v1=True), "parts[0].text", True),
        ]
        for body, where, v1 in cases:
            got = await _post(http, url, body, v1=v1)
            err = got.get("error")
            assert err is not None and err["code"] == -32602, (body, got)
            assert where in err["message"] and "lone surrogate" in err["message"], err
        # A surrogate pair (one character past the BMP) is fine.
        ok = await _post(http, url, _send('{"kind": "data", "data": {"text": "\\ud83d\\ude00"}}', "echo"))
        assert ok["result"]["artifacts"][0]["parts"][0]["data"]["text"] == "\U0001f600"
    assert len(await engine.list()) == before + 1  # only the last
    _no_traceback(caplog)


async def test_an_answer_a_part_cannot_hold_completes_as_json_text(odd: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    scopes = ("surrogate", "lone", "huge", "deep", "oddities")
    async with await odd.http_for(odd.alice, scopes=scopes) as http:
        url = f"{odd.gateway.url}/agents/odd/"
        for skill, expected, why in (
                ("surrogate", {"text": f"caf\u00e9 {LONE}", "ok": True}, "a lone surrogate at .text"),
                ("lone", "\udc00 alone", "a lone surrogate at the top"),
                ("huge", {"n": HUGE}, "a number out of a double's range at .n"),
                ("deep", {"deep": DEEP}, "nested deeper than a data part may be (protobuf parses 100 levels, about 2 "
                                         "per JSON level)")):
            got = await _post(http, url, _send('{"kind": "data", "data": {}}', skill))
            assert "result" in got, (skill, got)
            task = got["result"]
            assert task["status"]["state"] == "completed", (skill, task["status"])
            part = task["artifacts"][0]["parts"][0]
            assert part["metadata"]["hivemesh"]["carried_as"] == "json-text", part
            assert part["metadata"]["hivemesh"]["why"] == why, part
            assert part["text"].isascii() and json.loads(part["text"]) == expected, part
            run = await odd.gateway.executor.engine.get(task["id"])
            assert run.state == "COMPLETED"
            again = await _post(http, url, json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tasks/get",
                                                       "params": {"id": task["id"]}}).encode())
            assert again["result"]["status"]["state"] == "completed"
            assert again["result"]["artifacts"][0]["parts"][0]["text"] == part["text"]
        # A stream's items alike, each as it comes.
        client = await client_for(http, f"{url}.well-known/agent-card.json", streaming=True)
        updates = [e async for e in client.send_message(send_request({}, skill="oddities"))]
        chunks = [e.artifact_update.artifact.parts for e in updates if e.HasField("artifact_update")]
        texts = [t for parts in chunks for t in get_text_parts(parts)]
        assert [json.loads(t) for t in texts[:2]] == [{"n": HUGE}, LONE] and texts[2] == "fine", texts
        assert MessageToDict(chunks[0][0].metadata)["hivemesh"]["carried_as"] == "json-text"
        assert updates[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    _no_traceback(caplog)
    assert any("carried over A2A as JSON text" in r.getMessage() for r in caplog.records)  # a warning line


def test_a_non_finite_answer_is_carried_as_json_text() -> None:
    """No SDK agent can answer NaN or Infinity (its encoder refuses them), but the mesh client reads them from an
    agent in another language (`1e999` is JSON's grammar, json reads it as inf): a protobuf Value holds them, and
    a2a-sdk's JSON writer then fails on them."""
    for output, token in (({"x": math.inf}, "Infinity"), ([math.nan], "NaN"), (-math.inf, "-Infinity")):
        out = outcome_of(WorkflowState(id="t", definition=A2A_CALL, state="COMPLETED", output=output))
        assert out.state == TaskState.TASK_STATE_COMPLETED and out.artifact is not None
        part = out.artifact[0]
        assert part.HasField("text") and MessageToDict(part.metadata)["hivemesh"]["carried_as"] == "json-text"
        assert token in part.text, part.text
