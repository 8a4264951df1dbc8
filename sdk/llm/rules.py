"""The offline default model: deterministic rules instead of a network call, tool calls included.

Each reference agent gives it the rules for its tasks, so tests and demos are reproducible. In a chat with
tools it follows one plain rule, so the tool-calling loop runs end to end without a model: it calls every
offered tool the user's message names (in the order named), with the JSON object written right after the name
as arguments (`upper({"text": "hi"})`), or `{}`; once the results are in, it answers with them, one
`name: result` line each (or with the task's rule applied to the message and those lines).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hivemesh.sdk.llm.core import (
    _TOKEN_RE,
    ChatTurn,
    Completion,
    Message,
    ToolCall,
    Usage,
    count_tokens,
    record_usage,
)

Rule = Callable[[str], str]


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0][:2000]


def _text_of(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _named_calls(text: str, tool_names: Sequence[str]) -> list[tuple[str, str]]:
    """(name, arguments JSON) for each tool named in text, in the order of first mention."""
    found: list[tuple[int, str, str]] = []
    for name in tool_names:
        m = re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text)
        if m is None:
            continue
        args = "{}"
        rest = text[m.end():]
        if rest.startswith("("):
            try:
                value, _end = json.JSONDecoder().raw_decode(rest[1:])
            except ValueError:
                value = None
            if isinstance(value, dict):
                args = json.dumps(value, sort_keys=True)
        found.append((m.start(), name, args))
    return [(name, args) for _pos, name, args in sorted(found)]


class RuleBasedLLM:
    """A deterministic stand-in for a model: `rules[task](prompt)` gives the text; tokens are counted.

    Without a rule for the task it answers with the prompt's first sentence, which keeps pipelines flowing in
    demos while staying obviously mechanical.
    """

    def __init__(self, rules: Mapping[str, Rule] | None = None, *, model: str = "rules-v1") -> None:
        self.model = model
        self._rules = dict(rules or {})

    def _finish(self, text: str, max_tokens: int) -> str:
        words = _TOKEN_RE.findall(text)
        return " ".join(words[:max_tokens]) if len(words) > max_tokens else text

    async def complete(self, prompt: str, *, system: str = "", task: str = "", max_tokens: int = 512) -> Completion:
        rule = self._rules.get(task)
        text = self._finish(rule(prompt) if rule is not None else _first_sentence(prompt), max_tokens)
        usage = Usage(count_tokens(system) + count_tokens(prompt), count_tokens(text), self.model)
        record_usage(usage)
        return Completion(text, usage)

    async def chat(self, messages: Sequence[Message], *, tools: Sequence[Mapping[str, Any]] = (), task: str = "",
                   max_tokens: int = 512) -> ChatTurn:
        """Call the tools the last user message names, then answer with their results (see the module doc)."""
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        prompt = _text_of(messages[last_user]) if last_user >= 0 else ""
        after = list(messages[last_user + 1:])
        names_by_id = {c["id"]: c["function"]["name"] for m in after for c in m.get("tool_calls") or ()}
        results = [f"{names_by_id.get(m.get('tool_call_id'), 'tool')}: {_text_of(m)}"
                   for m in after if m.get("role") == "tool"]
        calls: tuple[ToolCall, ...] = ()
        text = ""
        offered = [str(t["function"]["name"]) for t in tools if isinstance(t.get("function"), dict)]
        if not names_by_id and offered:  # not asked yet in this turn: ask for the named tools
            calls = tuple(ToolCall(f"call_{i}", name, args)
                          for i, (name, args) in enumerate(_named_calls(prompt, offered)))
        if not calls:
            rule = self._rules.get(task)
            default = "\n".join(results) if results else _first_sentence(prompt)
            text = self._finish(rule("\n".join([prompt, *results])) if rule is not None else default, max_tokens)
        seen = sum(count_tokens(_text_of(m)) for m in messages)
        written = count_tokens(text) + sum(count_tokens(c.name + c.arguments) for c in calls)
        usage = Usage(seen, written, self.model)
        record_usage(usage)
        return ChatTurn(text, calls, usage)
