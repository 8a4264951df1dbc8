"""A real model over the OpenAI chat API, through the official `openai` package.

It speaks `/chat/completions`, which OpenAI, vLLM, llama.cpp's server, Ollama and others serve. The package
does what a hand-written client would get wrong: retries on 408/409/429/5xx and connection errors with
exponential backoff and jitter (honouring `Retry-After`), timeouts, streaming (server-sent events), and
cancellation (cancelling the awaiting task aborts the HTTP request). Its errors become hivemesh errors, so a
capability that uses a model fails with a clear gRPC status and never with a stack trace. The package is
imported when the first provider is made (it takes seconds to import; agents on the offline model never pay).

The endpoint is not trusted: the package builds its answer objects without validating them, so every field
used here is checked first (a malformed answer is an AgentError naming the field), token counts that are not
non-negative integers are replaced by our estimate, and no answer is read past `MAX_ANSWER_BYTES`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from hivemesh.mesh.errors import (
    AgentError,
    AgentUnavailableError,
    DeadlineExceededError,
    HivemeshError,
    InvalidInputError,
    RateLimitedError,
)
from hivemesh.sdk.llm.core import ChatTurn, Completion, Message, ToolCall, Usage, count_tokens, record_usage

if TYPE_CHECKING:
    import httpx2
    import openai

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES: Final = 8 * 1024 * 1024
"""The most bytes one answer (a body, or a whole stream) may have. A chat answer is KiBs even at a long
max_tokens, and the package buffers a body whole before parsing it, so without a cap a broken or hostile
endpoint could make the agent hold any amount of memory (a 300 MiB answer cost ~765 MiB before failing)."""

_METER_KEY: Final = "hivemesh.answer_meter"
_DONE_RE: Final = re.compile(rb"[\r\n]data: ?\[DONE\]")
_usage_warned: set[str] = set()  # configured model names whose bad token counts were logged already


@dataclass(frozen=True)
class OpenAIConfig:
    """Where an OpenAI-compatible endpoint is and how to call it."""

    base_url: str
    """e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (the path /chat/completions is appended)."""
    model: str
    api_key: str = ""
    timeout_s: float = 60.0
    """Per HTTP attempt; a capability's own deadline still bounds the whole call."""
    temperature: float = 0.0
    max_retries: int = 2
    """Retries after a 408/409/429/5xx answer or a connection error, with exponential backoff (0: none)."""

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.base_url):
            raise ValueError(f"LLM base URL must be http(s)://host[:port][/path], got {self.base_url!r}")
        if not self.model:
            raise ValueError("LLM model name is empty")
        if self.timeout_s <= 0:
            raise ValueError("LLM timeout must be positive")
        if not 0 <= self.max_retries <= 10:
            raise ValueError("LLM max_retries must be from 0 to 10")


def _hivemesh_error(exc: openai.OpenAIError, config: OpenAIConfig) -> HivemeshError:
    """The hivemesh error for an openai one: a timeout is DEADLINE_EXCEEDED, an unreachable endpoint
    UNAVAILABLE, a 400 (our request was refused, e.g. a prompt over the model's context) INVALID_ARGUMENT, a 429
    after the retries RESOURCE_EXHAUSTED with its Retry-After, anything else the endpoint answered (after retries)
    an AgentError naming the HTTP status."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return DeadlineExceededError(f"the model endpoint did not answer within {config.timeout_s} s")
    if isinstance(exc, openai.APIConnectionError):
        return AgentUnavailableError(f"the model endpoint {config.base_url} cannot be reached: {exc}")
    if isinstance(exc, openai.APIStatusError):
        detail = exc.response.text[:300]
        if exc.status_code == 400:
            return InvalidInputError(f"the model endpoint refused the request (HTTP 400): {detail}")
        if exc.status_code == 429:  # still, after the retries: the caller's to pace, as for the mesh's own limits
            return RateLimitedError(f"the model endpoint rate-limited the call (HTTP 429): {detail}",
                                    retry_after_s=_retry_after(exc.response.headers))
        return AgentError(f"the model endpoint answered HTTP {exc.status_code}: {detail}")
    return AgentError(f"the model endpoint's answer cannot be read: {str(exc)[:300]}")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """The pause the endpoint asked for in seconds (Retry-After-Ms, as OpenAI sends it, else Retry-After's delta
    form), or None when absent or not a sane number."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            seconds = float(headers[name]) * scale if name in headers else None
        except ValueError:
            continue
        if seconds is not None and 0 <= seconds <= 3600:
            return seconds
    return None


def _malformed(what: str) -> AgentError:
    return AgentError(f"the model endpoint's answer is malformed: {what}")


def _too_large() -> AgentError:
    return AgentError(f"the model endpoint's answer is too large (over {MAX_ANSWER_BYTES >> 20} MiB); refused")


def _get(part: Any, name: str) -> Any:
    """A field of a part of the answer, or None: the package builds its objects without validation, so a part
    may be one of its models, a plain dict or list, or a scalar where an object belongs."""
    if isinstance(part, dict):
        return part.get(name)
    if part is None or isinstance(part, (str, int, float, list)):
        return None
    return getattr(part, name, None)


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _malformed(f"{what} should be text, not {type(value).__name__}")
    return value


def _count(raw: Any, name: str, estimate: int, model: str) -> int:
    """The endpoint's count if it is a positive integer, else our estimate: a negative count would offset real
    usage (and leave a call uncharged), a non-integer one cannot be added up. Logged once per model."""
    value = _get(raw, name)
    if value is None or value == 0:
        return estimate
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if model not in _usage_warned:
        _usage_warned.add(model)
        log.warning("model %s reported %s=%.40r, not a non-negative integer; using the local estimate %d "
                    "(logged once per model)", model, name, value, estimate)
    return estimate


def _usage(raw: Any, model: str, seen: str, written: str, configured: str) -> Usage:
    """The endpoint's token counts, or our estimate where it reports none (or nonsense)."""
    return Usage(_count(raw, "prompt_tokens", count_tokens(seen), configured),
                 _count(raw, "completion_tokens", count_tokens(written), configured), model)


def _model_name(part: Any, default: str) -> str:
    name = _get(part, "model")
    return name if isinstance(name, str) and name else default


class _AnswerMeter:
    """Counts one answer's bytes as they arrive, refusing it past the cap, and notes a stream's closing
    `data: [DONE]` (the package swallows that line, and without it a stream cut short looks complete)."""

    def __init__(self) -> None:
        self.size = 0
        self.saw_done = False
        self._tail = b"\n"  # the stream's start counts as a line start

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > MAX_ANSWER_BYTES:
            raise _too_large()
        if not self.saw_done:
            window = self._tail + chunk
            self.saw_done = _DONE_RE.search(window) is not None
            self._tail = window[-16:]


def _capped_http_client() -> httpx2.AsyncClient:
    """The package's default HTTP client with every answer size-capped: a response hook refuses a declared
    Content-Length over the cap and wraps the body so its bytes are counted as they arrive. Compression is
    declined (and a compressed answer refused), as a small compressed body can unpack to any size. A
    hivemesh error raised here passes through the package unwrapped and unretried."""
    import httpx2
    import openai

    class CappedBody(httpx2.AsyncByteStream):
        def __init__(self, inner: httpx2.AsyncByteStream, meter: _AnswerMeter) -> None:
            self._inner, self._meter = inner, meter

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in self._inner:
                self._meter.feed(chunk)
                yield chunk

        async def aclose(self) -> None:
            await self._inner.aclose()

    async def cap(response: httpx2.Response) -> None:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise AgentError(f"the model endpoint compressed its answer ({encoding[:40]}) though asked not to; "
                             "refused, as its unpacked size cannot be bounded")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
            raise _too_large()
        if isinstance(response.stream, httpx2.AsyncByteStream):
            meter = _AnswerMeter()
            response.extensions[_METER_KEY] = meter
            response.stream = CappedBody(response.stream, meter)

    hooks: dict[str, list[Callable[[httpx2.Response], Awaitable[None]]]] = {"response": [cap]}
    return openai.DefaultAsyncHttpxClient(event_hooks=cast(Any, hooks), headers={"Accept-Encoding": "identity"})


class OpenAICompatibleLLM:
    """`complete`, `chat` (with tools) and `stream` against an OpenAI-compatible endpoint."""

    def __init__(self, config: OpenAIConfig) -> None:
        import openai

        self._errors: type[openai.OpenAIError] = openai.OpenAIError
        self.config = config
        self.model = config.model
        self._client = openai.AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key or "unused",  # local servers need none; the package insists on one
            timeout=config.timeout_s,
            max_retries=config.max_retries,
            http_client=_capped_http_client(),
        )

    async def close(self) -> None:
        """Release the HTTP connections."""
        await self._client.close()

    def _request(self, messages: Sequence[Message], max_tokens: int) -> dict[str, Any]:
        return {"model": self.config.model, "messages": cast(Any, list(messages)), "max_tokens": max_tokens,
                "temperature": self.config.temperature}

    async def chat(self, messages: Sequence[Message], *, tools: Sequence[Mapping[str, Any]] = (), task: str = "",
                   max_tokens: int = 512) -> ChatTurn:
        """One chat completion; the model may answer with tool calls (function tools)."""
        request = self._request(messages, max_tokens)
        if tools:
            request["tools"] = cast(Any, list(tools))
        try:
            answer: Any = await self._client.chat.completions.create(**request)
        except self._errors as exc:
            raise _hivemesh_error(exc, self.config) from None
        except ValueError:  # the body said JSON but was not (the package lets json's error through)
            raise AgentError("the model endpoint answered with something that is not JSON") from None
        except TypeError:
            raise _malformed("the package could not build an answer from it") from None
        choices = _get(answer, "choices")
        if not choices:
            raise AgentError("the model endpoint's answer has no choices")
        if not isinstance(choices, list):
            raise _malformed(f"'choices' should be a list, not {type(choices).__name__}")
        message = _get(choices[0], "message")
        if message is None:
            raise _malformed("the first choice has no 'message'")
        text = _text(_get(message, "content"), "the message's 'content'")
        raw_calls = _get(message, "tool_calls") or []
        if not isinstance(raw_calls, list):
            raise _malformed(f"'tool_calls' should be a list, not {type(raw_calls).__name__}")
        calls: list[ToolCall] = []
        for i, call in enumerate(raw_calls):
            function = _get(call, "function")
            if function is None:  # a custom (non-function) tool call: not something we offered
                kind = _get(call, "type")
                raise AgentError(f"the model asked for a {kind!r:.40} tool call; only function tools are offered")
            name = _get(function, "name")
            if not isinstance(name, str) or not name:
                raise _malformed(f"tool call {i} has no function name")
            arguments = _text(_get(function, "arguments"), f"the 'arguments' of tool call {name[:40]!r}")
            call_id = _get(call, "id")
            calls.append(ToolCall(call_id if isinstance(call_id, str) else f"call_{i}", name, arguments or "{}"))
        seen = " ".join(str(m.get("content") or "") for m in messages)
        written = text + "".join(c.name + c.arguments for c in calls)
        usage = _usage(_get(answer, "usage"), _model_name(answer, self.config.model), seen, written, self.model)
        record_usage(usage)
        return ChatTurn(text, tuple(calls), usage)

    async def complete(self, prompt: str, *, system: str = "", task: str = "", max_tokens: int = 512) -> Completion:
        messages: list[Message] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        turn = await self.chat(messages, task=task, max_tokens=max_tokens)
        return Completion(turn.text, turn.usage)

    async def stream(self, prompt: str, *, system: str = "", max_tokens: int = 512) -> AsyncIterator[str]:
        """Yield the answer's text as the endpoint sends it; its usage is recorded when the stream ends (also
        when it fails part way: the text yielded was spent). A stream that ends without its closing
        `data: [DONE]` or a finish_reason was cut short and raises an AgentError."""
        messages: list[Message] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        request = self._request(messages, max_tokens)
        parts: list[str] = []
        raw_usage: Any = None
        model = self.config.model
        finished = started = False
        failure: HivemeshError | None = None
        try:
            chunks = await self._client.chat.completions.create(
                **request, stream=True, stream_options={"include_usage": True})
            started = True
            meter = chunks.response.extensions.get(_METER_KEY)
            async with chunks:
                async for chunk in chunks:
                    model = _model_name(chunk, model)
                    raw_usage = _get(chunk, "usage") or raw_usage
                    choices = _get(chunk, "choices")
                    if not isinstance(choices, list):
                        raise _malformed(f"a stream event's 'choices' should be a list, not {type(choices).__name__}")
                    for choice in choices:
                        finished = finished or bool(_get(choice, "finish_reason"))
                        content = _text(_get(_get(choice, "delta"), "content"), "a stream event's 'content'")
                        if content:
                            parts.append(content)
                            yield content
            if not finished and not (isinstance(meter, _AnswerMeter) and meter.saw_done):
                failure = AgentError("the model endpoint's stream ended before its final event (no [DONE] and no "
                                     "finish_reason): the answer was cut short")
        except self._errors as exc:
            failure = _hivemesh_error(exc, self.config)
        except (ValueError, TypeError):  # an event that is not JSON, or not shaped like one the package knows
            failure = _malformed("a stream event is not a JSON chat completion chunk")
        except HivemeshError as exc:
            failure = exc
        if started:
            record_usage(_usage(raw_usage, model, system + " " + prompt, "".join(parts), self.model))
        if failure is not None:
            raise failure from None
