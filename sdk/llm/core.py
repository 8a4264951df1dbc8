"""Language models behind one small interface, offline by default.

    llm = llm_from_env()                       # RuleBasedLLM unless HIVEMESH_LLM=openai
    done = await llm.complete("Summarize: ...", task="summarize")
    done.text, done.usage.input_tokens, done.usage.output_tokens

The default, `RuleBasedLLM`, is deterministic and needs no network: each reference agent gives it the rules
for its tasks, so tests and demos are reproducible. `OpenAICompatibleLLM` speaks the `/chat/completions`
API that OpenAI, vLLM, llama.cpp's server, Ollama and others serve; it is chosen by configuration
(`HIVEMESH_LLM=openai`, `HIVEMESH_LLM_BASE_URL`, `HIVEMESH_LLM_MODEL`, key in `HIVEMESH_LLM_API_KEY` or
`OPENAI_API_KEY`) and uses only the standard library. `TieredLLM` sends simple prompts to a smaller model.

Every completion is counted: when a capability runs, the SDK opens a `UsageMeter` for the call and every
completion made while it runs adds to it; the total goes back to the caller in `InvokeResponse.usage`, and a
per-caller token budget (`hivemesh.mesh.budget`) is charged with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from hivemesh.mesh.errors import AgentError, AgentUnavailableError, DeadlineExceededError, InvalidInputError

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


Rule = Callable[[str], str]


class RuleBasedLLM:
    """A deterministic stand-in for a model: `rules[task](prompt)` gives the text; tokens are counted.

    Without a rule for the task it answers with the prompt's first sentence, which keeps pipelines flowing in
    demos while staying obviously mechanical.
    """

    def __init__(self, rules: Mapping[str, Rule] | None = None, *, model: str = "rules-v1") -> None:
        self.model = model
        self._rules = dict(rules or {})

    async def complete(self, prompt: str, *, system: str = "", task: str = "", max_tokens: int = 512) -> Completion:
        rule = self._rules.get(task)
        if rule is not None:
            text = rule(prompt)
        else:
            first = re.split(r"(?<=[.!?])\s", prompt.strip(), maxsplit=1)[0]
            text = first[:2000]
        words = _TOKEN_RE.findall(text)
        if len(words) > max_tokens:
            text = " ".join(words[:max_tokens])
        usage = Usage(count_tokens(system) + count_tokens(prompt), count_tokens(text), self.model)
        record_usage(usage)
        return Completion(text, usage)


@dataclass(frozen=True)
class OpenAIConfig:
    """Where an OpenAI-compatible endpoint is and how to call it."""

    base_url: str
    """e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 (the path /chat/completions is appended)."""
    model: str
    api_key: str = ""
    timeout_s: float = 60.0
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if not re.match(r"^https?://[^/\s]+", self.base_url):
            raise ValueError(f"LLM base URL must be http(s)://host[:port][/path], got {self.base_url!r}")
        if not self.model:
            raise ValueError("LLM model name is empty")
        if self.timeout_s <= 0:
            raise ValueError("LLM timeout must be positive")


class OpenAICompatibleLLM:
    """Calls `POST {base_url}/chat/completions` (urllib in a worker thread: no extra dependency)."""

    def __init__(self, config: OpenAIConfig) -> None:
        self.config = config
        self.model = config.model

    def _post(self, body: bytes) -> dict[str, Any]:
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise AgentError(f"the model endpoint answered HTTP {exc.code}: {detail}") from None
        except TimeoutError:
            raise DeadlineExceededError(f"the model endpoint did not answer within {self.config.timeout_s} s") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AgentUnavailableError(f"the model endpoint {url} cannot be reached: {exc}") from None
        try:
            parsed = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AgentError("the model endpoint answered with something that is not JSON") from None
        if not isinstance(parsed, dict):
            raise AgentError("the model endpoint answered with JSON that is not an object")
        return parsed

    async def complete(self, prompt: str, *, system: str = "", task: str = "", max_tokens: int = 512) -> Completion:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        body = json.dumps({
            "model": self.config.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": self.config.temperature,
        }).encode()
        data = await asyncio.to_thread(self._post, body)
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise AgentError("the model endpoint's answer has no choices[0].message.content") from None
        if not isinstance(text, str):
            raise AgentError("the model endpoint's message content is not text")
        raw_usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        assert isinstance(raw_usage, dict)
        usage = Usage(
            int(raw_usage.get("prompt_tokens") or count_tokens(system) + count_tokens(prompt)),
            int(raw_usage.get("completion_tokens") or count_tokens(text)),
            str(data.get("model") or self.config.model),
        )
        record_usage(usage)
        return Completion(text, usage)


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


def llm_from_env(rules: Mapping[str, Rule] | None = None, env: Mapping[str, str] | None = None) -> LLM:
    """The model configuration says: `HIVEMESH_LLM` = `rules` (default, offline) or `openai`.

    Raises:
        InvalidInputError: for an unknown HIVEMESH_LLM or an incomplete OpenAI configuration.
    """
    e = os.environ if env is None else env
    kind = (e.get("HIVEMESH_LLM") or "rules").strip().lower()
    if kind == "rules":
        return RuleBasedLLM(rules)
    if kind == "openai":
        base = e.get("HIVEMESH_LLM_BASE_URL") or "https://api.openai.com/v1"
        model = e.get("HIVEMESH_LLM_MODEL") or ""
        key = e.get("HIVEMESH_LLM_API_KEY") or e.get("OPENAI_API_KEY") or ""
        try:
            return OpenAICompatibleLLM(OpenAIConfig(base_url=base, model=model, api_key=key))
        except ValueError as exc:
            hint = "set HIVEMESH_LLM_MODEL, HIVEMESH_LLM_BASE_URL"
            raise InvalidInputError(f"HIVEMESH_LLM=openai: {exc} ({hint})") from None
    raise InvalidInputError(f"HIVEMESH_LLM must be 'rules' or 'openai', not {kind!r}")
