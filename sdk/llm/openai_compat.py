"""A real model over the OpenAI chat API, through the official `openai` package.

It speaks `/chat/completions`, which OpenAI, vLLM, llama.cpp's server, Ollama and others serve. The package
does what a hand-written client would get wrong: retries on 408/409/429/5xx and connection errors with
exponential backoff and jitter (honouring `Retry-After`), timeouts, streaming (server-sent events), and
cancellation (cancelling the awaiting task aborts the HTTP request). Its errors become hivemesh errors, so a
capability that uses a model fails with a clear gRPC status and never with a stack trace. The package is
imported when the first provider is made (it takes seconds to import; agents on the offline model never pay).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from hivemesh.mesh.errors import AgentError, AgentUnavailableError, DeadlineExceededError, HivemeshError
from hivemesh.sdk.llm.core import ChatTurn, Completion, Message, ToolCall, Usage, count_tokens, record_usage

if TYPE_CHECKING:
    import openai


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
    UNAVAILABLE, anything the endpoint answered (after retries) an AgentError naming the HTTP status."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return DeadlineExceededError(f"the model endpoint did not answer within {config.timeout_s} s")
    if isinstance(exc, openai.APIConnectionError):
        return AgentUnavailableError(f"the model endpoint {config.base_url} cannot be reached: {exc}")
    if isinstance(exc, openai.APIStatusError):
        detail = exc.response.text[:300]
        return AgentError(f"the model endpoint answered HTTP {exc.status_code}: {detail}")
    return AgentError(f"the model endpoint's answer cannot be read: {str(exc)[:300]}")


def _usage(raw: Any, model: str, seen: str, written: str) -> Usage:
    """The endpoint's token counts, or our estimate where it reports none."""
    prompt = getattr(raw, "prompt_tokens", None) if raw is not None else None
    completion = getattr(raw, "completion_tokens", None) if raw is not None else None
    return Usage(int(prompt or count_tokens(seen)), int(completion or count_tokens(written)), model)


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
            answer = await self._client.chat.completions.create(**request)
        except self._errors as exc:
            raise _hivemesh_error(exc, self.config) from None
        except ValueError:  # the body said JSON but was not (the package lets json's error through)
            raise AgentError("the model endpoint answered with something that is not JSON") from None
        if not getattr(answer, "choices", None):
            raise AgentError("the model endpoint's answer has no choices")
        message = answer.choices[0].message
        text = message.content or ""
        calls: list[ToolCall] = []
        for call in message.tool_calls or ():
            function = getattr(call, "function", None)
            if function is None:  # a custom (non-function) tool call: not something we offered
                raise AgentError(f"the model asked for a {call.type!r} tool call; only function tools are offered")
            calls.append(ToolCall(call.id, function.name, function.arguments or "{}"))
        seen = " ".join(str(m.get("content") or "") for m in messages)
        written = text + "".join(c.name + c.arguments for c in calls)
        usage = _usage(answer.usage, answer.model or self.config.model, seen, written)
        record_usage(usage)
        return ChatTurn(text, tuple(calls), usage)

    async def complete(self, prompt: str, *, system: str = "", task: str = "", max_tokens: int = 512) -> Completion:
        messages: list[Message] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        turn = await self.chat(messages, task=task, max_tokens=max_tokens)
        return Completion(turn.text, turn.usage)

    async def stream(self, prompt: str, *, system: str = "", max_tokens: int = 512) -> AsyncIterator[str]:
        """Yield the answer's text as the endpoint sends it; its usage is recorded when the stream ends."""
        messages: list[Message] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        request = self._request(messages, max_tokens)
        parts: list[str] = []
        raw_usage: Any = None
        model = self.config.model
        try:
            chunks = await self._client.chat.completions.create(
                **request, stream=True, stream_options={"include_usage": True})
            async with chunks:
                async for chunk in chunks:
                    model = chunk.model or model
                    raw_usage = chunk.usage or raw_usage
                    for choice in chunk.choices:
                        if choice.delta.content:
                            parts.append(choice.delta.content)
                            yield choice.delta.content
        except self._errors as exc:
            raise _hivemesh_error(exc, self.config) from None
        record_usage(_usage(raw_usage, model, system + " " + prompt, "".join(parts)))
