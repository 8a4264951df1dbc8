"""The model interface every provider implements, and the token accounting every completion goes through.

Two shapes: `LLM.complete(prompt) -> Completion` for plain text, and `ChatModel.chat(messages, tools=) ->
ChatTurn` for the tool-calling loop (`hivemesh.sdk.tools`). Messages and tool specs are in the OpenAI chat
format (plain dicts), which every OpenAI-compatible server and the offline rule-based model understand.

Every completion is counted: when a capability runs, the SDK opens a `UsageMeter` for the call and every
completion made while it runs adds to it; the total goes back to the caller in `InvokeResponse.usage`, and a
per-caller token budget (`hivemesh.mesh.budget`) is charged with it.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, Any]
"""One chat message in the OpenAI format: {"role": "user", "content": "..."}, an assistant message with
"tool_calls", or {"role": "tool", "tool_call_id": ..., "content": ...}."""

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """A deterministic token estimate: words and punctuation marks (close to BPE counts for English prose)."""
    return len(_TOKEN_RE.findall(text))


@dataclass(frozen=True)
class Usage:
    """Tokens one completion (or one call, summed) consumed."""

    input_tokens: int = 0
    output_tokens: int = 0
    model: str = ""

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        models = [m for m in (self.model, other.model) if m]
        model = models[0] if len(set(models)) == 1 else ",".join(sorted(set(models)))
        return Usage(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens, model)

    def to_json(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "model": self.model}


@dataclass(frozen=True)
class Completion:
    text: str
    usage: Usage


@dataclass
class UsageMeter:
    """Sums the usage of every completion made while it is current (one per capability call)."""

    usage: Usage = field(default_factory=Usage)
    calls: int = 0

    def add(self, usage: Usage) -> None:
        self.usage = self.usage + usage
        self.calls += 1


_current_meter: contextvars.ContextVar[UsageMeter | None] = contextvars.ContextVar("hivemesh_usage", default=None)


class _Metering:
    """`metering`'s context manager: a plain class, as it runs around every capability call (a generator-based
    `contextlib.contextmanager` costs several times more to enter and leave)."""

    __slots__ = ("_meter", "_token")

    def __init__(self, meter: UsageMeter) -> None:
        self._meter = meter
        self._token: contextvars.Token[UsageMeter | None] | None = None

    def __enter__(self) -> UsageMeter:
        self._token = _current_meter.set(self._meter)
        return self._meter

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _current_meter.reset(self._token)
            self._token = None


def metering(meter: UsageMeter) -> contextlib.AbstractContextManager[UsageMeter]:
    """Make meter current for the code inside (the SDK servicer does this around every capability call)."""
    return _Metering(meter)


def record_usage(usage: Usage) -> None:
    """Add usage to the current call's meter, if any (LLM implementations call this once per completion)."""
    meter = _current_meter.get()
    if meter is not None:
        meter.add(usage)


@runtime_checkable
class LLM(Protocol):
    """A text model. `task` names what the prompt is for, so rule-based models can pick a rule."""

    model: str

    async def complete(self, prompt: str, *, system: str = "", task: str = "", max_tokens: int = 512) -> Completion:
        ...


@dataclass(frozen=True)
class ToolCall:
    """One tool call the model asked for: `arguments` is the JSON text the model wrote (not yet trusted)."""

    id: str
    name: str
    arguments: str

    def to_message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ChatTurn:
    """The model's answer to one chat request: text, or tool calls to run before it answers (or both)."""

    text: str
    tool_calls: tuple[ToolCall, ...]
    usage: Usage

    def to_message(self) -> Message:
        """The assistant message to append to the conversation before the tool results."""
        msg: Message = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_message() for c in self.tool_calls]
        return msg


@runtime_checkable
class ChatModel(Protocol):
    """A model that takes a conversation and may answer with tool calls (tools: OpenAI tool specs)."""

    model: str

    async def chat(self, messages: Sequence[Message], *, tools: Sequence[Mapping[str, Any]] = (), task: str = "",
                   max_tokens: int = 512) -> ChatTurn:
        ...


class TieredLLM:
    """Route simple prompts to a small model and the rest to a large one (the cheap-first rule of thumb)."""

    def __init__(self, small: LLM, large: LLM, *, max_simple_tokens: int = 200,
                 is_simple: Callable[[str, str], bool] | None = None) -> None:
        self.small, self.large = small, large
        self.model = f"{small.model}|{large.model}"
        self._is_simple = is_simple or (lambda prompt, _task: count_tokens(prompt) <= max_simple_tokens)

    def pick(self, prompt: str, task: str = "") -> LLM:
        return self.small if self._is_simple(prompt, task) else self.large

    async def complete(self, prompt: str, *, system: str = "", task: str = "", max_tokens: int = 512) -> Completion:
        return await self.pick(prompt, task).complete(prompt, system=system, task=task, max_tokens=max_tokens)

    async def chat(self, messages: Sequence[Message], *, tools: Sequence[Mapping[str, Any]] = (), task: str = "",
                   max_tokens: int = 512) -> ChatTurn:
        """Pick by the last user message (a whole tool loop stays on the model its question picked)."""
        last = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        content = last.get("content")
        model = self.pick(content if isinstance(content, str) else "", task)
        if not isinstance(model, ChatModel):
            raise TypeError(f"model {model.model!r} has no chat(): it cannot call tools")
        return await model.chat(messages, tools=tools, task=task, max_tokens=max_tokens)
