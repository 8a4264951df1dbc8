"""The OpenAI-compatible provider against a hostile endpoint (a real HTTP server on 127.0.0.1): malformed
answers and stream events, nonsense token counts, oversized or compressed answers, streams cut short and a
refused request each become a clear hivemesh error (or a safe fallback), never a crash or unbounded memory."""

from __future__ import annotations

import gzip
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hivemesh.mesh.errors import AgentError, InvalidInputError
from hivemesh.sdk.llm import OpenAICompatibleLLM, OpenAIConfig, UsageMeter, count_tokens, metering
from hivemesh.sdk.llm.openai_compat import MAX_ANSWER_BYTES
from tests.support.chat_server import Canned, ChatScript, chat_server


class Endpoint:
    """The scripted server plus the providers made against it (closed when the test ends)."""

    def __init__(self, base_url: str, script: ChatScript) -> None:
        self.base_url, self.script = base_url, script
        self.clients: list[OpenAICompatibleLLM] = []

    def llm(self, canned: Canned, *, max_retries: int = 0) -> OpenAICompatibleLLM:
        """A provider whose (unique) model name gets the canned reply."""
        model = f"hostile-{uuid.uuid4().hex[:8]}"
        self.script.canned[model] = canned
        client = OpenAICompatibleLLM(OpenAIConfig(self.base_url, model, max_retries=max_retries, timeout_s=10))
        self.clients.append(client)
        return client

    def requests_for(self, llm: OpenAICompatibleLLM) -> int:
        return sum(1 for s in self.script.seen if s["body"]["model"] == llm.model)


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    with chat_server() as (base_url, script):
        ep = Endpoint(base_url, script)
        try:
            yield ep
        finally:
            for client in ep.clients:
                await client.close()


def completion(message: dict[str, Any], usage: dict[str, Any] | None = None, **top: Any) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                       "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": "stop"}],
                       **({"usage": usage} if usage is not None else {}), **top}).encode()


def events(*chunks: dict[str, Any], done: bool = True, declared: int | None = None) -> Canned:
    data = b"".join(b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                             **c}).encode() + b"\n\n" for c in chunks)
    return Canned(data + (b"data: [DONE]\n\n" if done else b""), content_type="text/event-stream", declared=declared)


def delta(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def call(name: Any, arguments: Any) -> dict[str, Any]:
    return {"content": None, "tool_calls": [{"id": "c1", "type": "function",
                                             "function": {"name": name, "arguments": arguments}}]}


# --- bug 8: a malformed but parseable answer is an AgentError naming what was wrong ------------------------------
@pytest.mark.parametrize(("body", "says"), [
    (json.dumps({"choices": [{}]}).encode(), "the first choice has no 'message'"),
    (json.dumps({"choices": "abc"}).encode(), "'choices' should be a list, not str"),
    (completion(call(None, "{}")), "tool call 0 has no function name"),
    (completion(call("lookup", {"q": "x"})), "the 'arguments' of tool call 'lookup' should be text, not dict"),
    (completion({"content": 123}), "the message's 'content' should be text, not int"),
    (completion({"content": "hi", "tool_calls": "many"}), "'tool_calls' should be a list, not str"),
], ids=["choice-empty", "choices-string", "tool-name-null", "tool-arguments-object", "content-int",
        "tool-calls-string"])
async def test_a_malformed_answer_is_an_agent_error_naming_the_field(endpoint: Endpoint, body: bytes,
                                                                       says: str) -> None:
    llm = endpoint.llm(Canned(body))
    meter = UsageMeter()
    with metering(meter), pytest.raises(AgentError) as refused:
        await llm.chat([{"role": "user", "content": "hello"}], tools=[{"type": "function",
                                                                       "function": {"name": "lookup"}}])
    assert type(refused.value) is AgentError and refused.value.message.startswith("the model endpoint's answer")
    assert says in refused.value.message
    assert meter.calls == 0


@pytest.mark.parametrize(("canned", "says"), [
    (Canned(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\ndata: {not json\n\n',
            content_type="text/event-stream"), "a stream event is not a JSON chat completion chunk"),
    (events({"choices": None}), "a stream event's 'choices' should be a list, not NoneType"),
    (events(delta("a"), {"choices": [{"index": 0, "delta": {"content": 7}}]}),
     "a stream event's 'content' should be text, not int"),
], ids=["not-json", "choices-null", "content-int"])
async def test_a_malformed_stream_event_is_an_agent_error(endpoint: Endpoint, canned: Canned, says: str) -> None:
    llm = endpoint.llm(canned)
    meter = UsageMeter()
    got: list[str] = []
    with metering(meter), pytest.raises(AgentError) as refused:
        async for part in llm.stream("hello"):
            got.append(part)
    assert type(refused.value) is AgentError and says in refused.value.message
    assert meter.calls == 1 and meter.usage.output_tokens == count_tokens("".join(got))  # what was sent is counted


# --- bug 9: a negative or non-integer token count is replaced by the local estimate, logged once per model -------
async def test_nonsense_token_counts_fall_back_to_the_estimate_and_are_logged_once(
        endpoint: Endpoint, caplog: pytest.LogCaptureFixture) -> None:
    negative = endpoint.llm(Canned(completion({"content": "hi there"},
                                              {"prompt_tokens": -1_000_000, "completion_tokens": -5})))
    text = endpoint.llm(Canned(completion({"content": "hi there"}, {"prompt_tokens": "abc", "completion_tokens": 4})))
    fractional = endpoint.llm(Canned(completion({"content": "x"}, {"prompt_tokens": 2.5, "completion_tokens": True})))
    meter = UsageMeter()
    caplog.set_level(logging.WARNING, "hivemesh.sdk.llm.openai_compat")
    with metering(meter):
        for _ in range(3):
            turn = await negative.complete("one two three")
            assert (turn.usage.input_tokens, turn.usage.output_tokens) == (3, 2)
        turn = await text.complete("one two three")
        assert (turn.usage.input_tokens, turn.usage.output_tokens) == (3, 4)  # the valid count is kept
        turn = await fractional.complete("one two three")
        assert (turn.usage.input_tokens, turn.usage.output_tokens) == (3, 1)
    assert meter.usage.total == 3 * 5 + 7 + 4 > 0
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3 and all("using the local estimate" in m for m in logged)  # once per model
    assert next(m for m in logged if negative.model in m).count("prompt_tokens=-1000000") == 1

    streamed = endpoint.llm(events(delta("a b", "stop"), {"choices": [], "usage": {"prompt_tokens": -999,
                                                                                   "completion_tokens": -1}}))
    meter = UsageMeter()
    with metering(meter):
        assert [p async for p in streamed.stream("one two")] == ["a b"]
    assert (meter.usage.input_tokens, meter.usage.output_tokens) == (count_tokens(" one two"), 2)


# --- bug 10: answers are capped; cut-short streams and refused requests are reported --------------------------------
async def test_an_answer_declared_over_the_cap_is_refused_before_reading_and_not_retried(endpoint: Endpoint) -> None:
    llm = endpoint.llm(Canned(b'{"choices": [', declared=300 * 1024 * 1024), max_retries=2)
    with pytest.raises(AgentError, match=r"too large \(over 8 MiB\)"):
        await llm.complete("hello")
    assert endpoint.requests_for(llm) == 1


async def test_an_answer_over_the_cap_without_a_length_is_refused_as_it_arrives(endpoint: Endpoint) -> None:
    big = completion({"content": "a" * (MAX_ANSWER_BYTES + 1024)})
    llm = endpoint.llm(Canned(big, declared=-1))
    with pytest.raises(AgentError, match="too large"):
        await llm.complete("hello")
    fits = endpoint.llm(Canned(completion({"content": "a" * (MAX_ANSWER_BYTES - 4096)}), declared=-1))
    assert len((await fits.complete("hello")).text) == MAX_ANSWER_BYTES - 4096  # the cap itself is allowed


async def test_a_stream_over_the_cap_is_refused_and_what_was_sent_is_counted(endpoint: Endpoint) -> None:
    piece = "b" * 65536
    llm = endpoint.llm(events(*[delta(piece) for _ in range(MAX_ANSWER_BYTES // len(piece) + 2)],
                              delta("", "stop"), declared=-1))  # no length: only counting can stop it
    meter = UsageMeter()
    got = 0
    with metering(meter), pytest.raises(AgentError, match="too large"):
        async for part in llm.stream("hello"):
            got += len(part)
    assert 0 < got <= MAX_ANSWER_BYTES and meter.calls == 1


async def test_a_compressed_answer_is_refused_as_its_size_cannot_be_bounded(endpoint: Endpoint) -> None:
    bomb = gzip.compress(completion({"content": "a" * (MAX_ANSWER_BYTES + 1024)}))
    assert len(bomb) < 100_000
    llm = endpoint.llm(Canned(bomb, headers={"Content-Encoding": "gzip"}))
    with pytest.raises(AgentError, match=r"compressed its answer \(gzip\)"):
        await llm.complete("hello")
    assert endpoint.script.seen[-1]["body"]["model"] == llm.model


async def test_a_stream_cut_short_is_an_agent_error_but_its_text_is_counted(endpoint: Endpoint) -> None:
    cut = endpoint.llm(events(delta("partial"), delta(" data: [DONE] in the text"), done=False))
    meter = UsageMeter()
    got: list[str] = []
    with metering(meter), pytest.raises(AgentError, match="cut short"):
        async for part in cut.stream("hello"):
            got.append(part)
    assert got == ["partial", " data: [DONE] in the text"] and meter.calls == 1
    assert meter.usage.output_tokens == count_tokens("".join(got))
    finished = endpoint.llm(events(delta("whole", "stop"), done=False))  # a finish_reason is an end too
    assert [p async for p in finished.stream("hello")] == ["whole"]
    crlf = b'data: {"choices":[{"index":0,"delta":{"content":"ok"}}]}\r\n\r\ndata:[DONE]\r\n\r\n'
    done_only = endpoint.llm(Canned(crlf, content_type="text/event-stream"))  # [DONE] alone ends it too
    assert [p async for p in done_only.stream("hello")] == ["ok"]


async def test_a_request_the_model_refuses_as_invalid_is_invalid_input(endpoint: Endpoint) -> None:
    llm = endpoint.llm(Canned(b'{"error": {"message": "prompt is longer than the context"}}', status=400),
                       max_retries=2)
    with pytest.raises(InvalidInputError, match=r"refused the request \(HTTP 400\).*longer than the context"):
        await llm.complete("hello")
    assert endpoint.requests_for(llm) == 1
