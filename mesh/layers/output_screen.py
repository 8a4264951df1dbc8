"""Output screening: secrets and personal data in an agent's answer, before it leaves the agent's side.

An agent's model may echo a credential from its context or a customer's personal data into an answer. Each
capability's card declares what the mesh does then (`Capability.output_screen`): refuse (AGENT_ERROR, reason
OUTPUT_SCREENED: the agent's fault, and the caller learns only the rules that matched), redact (each match
replaced by `[REDACTED:<rule>]`), or record (passed unchanged). The findings are noted on the call for the
audit record in every case. Declared on the card rather than as a policy kind: what an answer may carry is a
property of the capability its owner knows, it travels with the card (registered, so readable from the
registry) to both packagings and needs no policy mirror.

Detection is pluggable: a classifier takes a text and returns the spans it flags (`Span`); the default is
`PatternClassifier` (API keys of common providers, PEM private keys, emails, phone numbers, card numbers that
pass the Luhn check). JSON answers are screened string by string (redaction keeps the JSON valid); text/*
answers as one text; other content types pass unscreened.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf.message import DecodeError

from hivemesh.mesh import json_fast
from hivemesh.mesh.errors import OutputScreenedError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.layers.screen import MAX_SCREEN_DEPTH
from hivemesh.v1 import agent_pb2

TOO_DEEP: Final = "nested-too-deep"
"""The finding of a part of an answer nested deeper than the screen reads (`MAX_SCREEN_DEPTH`)."""
NOTE: Final = "output_screen"
"""`Inbound.notes` key of the findings, which the audit record keeps: {"action", "rules", "count"}."""


@dataclass(frozen=True)
class Span:
    """One flagged part of a text: the rule and the [start, end) characters it matched."""

    rule: str
    start: int
    end: int


Classifier = Callable[[str], Iterable[Span]]
"""Returns the spans of a text that must not leave (a local model, a DLP service's client...)."""


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a card number (digits only): true for real card numbers, ~1 in 10 of others."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_PATTERNS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    ("private-key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*"
                               r"PRIVATE KEY-----)?")),
    ("api-key", re.compile(
        r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|sk_(?:live|test)_[A-Za-z0-9]{16,}|AKIA[0-9A-Z]{16}|"
        r"gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}|xox[abposr]-[A-Za-z0-9-]{10,}|"
        r"AIza[0-9A-Za-z_-]{35}|glpat-[A-Za-z0-9_-]{20,})")),
    ("email", re.compile(r"\b[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b")),
    ("card-number", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")),
    ("phone", re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                         r"\d{3,4}[ .-]\d{3,4}(?!\w|[ .-]\d)")),
)


class PatternClassifier:
    """The default classifier: regular expressions, with card numbers confirmed by Luhn."""

    def __init__(self, patterns: Sequence[tuple[str, re.Pattern[str]]] = _PATTERNS) -> None:
        self.patterns = tuple(patterns)

    def __call__(self, text: str) -> list[Span]:
        spans: list[Span] = []
        taken: list[tuple[int, int]] = []
        for rule, pattern in self.patterns:
            for m in pattern.finditer(text):
                if rule == "card-number" and not luhn_ok(re.sub(r"\D", "", m.group(0))):
                    continue
                if any(m.start() < e and s < m.end() for s, e in taken):
                    continue  # already flagged by an earlier (more specific) rule: a card is not also a phone
                taken.append((m.start(), m.end()))
                spans.append(Span(rule, m.start(), m.end()))
        return spans


DEFAULT_CLASSIFIER: Final = PatternClassifier()
_TEXT_TYPES: Final = frozenset({"", "application/json"})
_ACTION_NAMES: Final[dict[int, str]] = {
    agent_pb2.OUTPUT_SCREEN_REFUSE: "refuse", agent_pb2.OUTPUT_SCREEN_REDACT: "redact",
    agent_pb2.OUTPUT_SCREEN_RECORD: "record",
}


def redact(text: str, spans: Iterable[Span]) -> str:
    """text with each span replaced by `[REDACTED:<rule>]`."""
    out, at = [], 0
    for span in sorted(spans, key=lambda s: s.start):
        if span.start < at:
            continue
        out.append(text[at:span.start])
        out.append(f"[REDACTED:{span.rule}]")
        at = span.end
    out.append(text[at:])
    return "".join(out)


class _Scan:
    """Screens the strings of one decoded answer, redacting as it goes when asked."""

    def __init__(self, classify: Classifier, redacting: bool) -> None:
        self.classify = classify
        self.redacting = redacting
        self.rules: dict[str, int] = {}

    def text(self, text: str) -> str:
        spans = list(self.classify(text))
        for s in spans:
            self.rules[s.rule] = self.rules.get(s.rule, 0) + 1
        return redact(text, spans) if spans and self.redacting else text

    def value(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if depth >= MAX_SCREEN_DEPTH and isinstance(value, dict | list):
            # Nested deeper than the screen reads: flagged as a finding of its own (withheld, redacted whole or
            # recorded, as the card says), never passed on unread.
            self.rules[TOO_DEEP] = self.rules.get(TOO_DEEP, 0) + 1
            return f"[REDACTED:{TOO_DEEP}]" if self.redacting else value
        if isinstance(value, dict):
            return {self.text(k) if isinstance(k, str) else k: self.value(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, depth + 1) for v in value]
        return value


class OutputScreenLayer:
    """An answering layer: `answer` screens each answer (a unary response or a stream chunk, as a message or
    the bytes a sidecar relays) of the capabilities whose card asks for it. Admits every call."""

    name = "output-screen"

    def __init__(self, actions: dict[str, int], classify: Classifier = DEFAULT_CLASSIFIER) -> None:
        """actions: capability -> `OutputScreen` value (only the screened ones)."""
        self.actions = actions
        self.classify = classify

    def check(self, call: Inbound) -> None:
        return None

    def answer(self, call: Inbound, response: Any) -> Any:
        req = call.request
        if req is None:
            return response
        action = self.actions.get(req.capability)
        if not action:
            return response
        raw = isinstance(response, bytes)
        kind = agent_pb2.InvokeChunk if call.method == "InvokeStream" else agent_pb2.InvokeResponse
        msg = response
        if raw:
            try:
                msg = kind.FromString(response)
            except DecodeError:
                return response  # not ours to judge: the caller's decoder refuses it
        if not isinstance(msg, agent_pb2.InvokeResponse | agent_pb2.InvokeChunk):
            return response
        data = msg.output if isinstance(msg, agent_pb2.InvokeResponse) else msg.data
        scan = _Scan(self.classify, redacting=action == agent_pb2.OUTPUT_SCREEN_REDACT)
        screened = self._screen(data, msg.content_type, scan)
        if not scan.rules:
            return response
        rules = sorted(scan.rules)
        name = _ACTION_NAMES.get(action, str(action))
        seen = call.notes.get(NOTE)
        count = sum(scan.rules.values()) + (seen["count"] if seen else 0)
        call.notes[NOTE] = {"action": name, "rules": sorted({*rules, *(seen["rules"] if seen else ())}),
                            "count": count}
        if action == agent_pb2.OUTPUT_SCREEN_REFUSE:
            raise OutputScreenedError(
                f"the answer of {req.capability!r} was withheld: it carries {', '.join(rules)} (output screen)",
                metadata={"capability": req.capability[:128], "rules": ",".join(rules)[:256]},
            )
        if action != agent_pb2.OUTPUT_SCREEN_REDACT or screened is None:
            return response
        msg = kind.FromString(response) if raw else type(msg)()  # never change the handler's own message
        if not raw:
            msg.CopyFrom(response)
        if isinstance(msg, agent_pb2.InvokeResponse):
            msg.output = screened
        else:
            msg.data = screened
        return msg.SerializeToString() if raw else msg

    @staticmethod
    def _screen(data: bytes, content_type: str, scan: _Scan) -> bytes | None:
        """The screened (and, when redacting, redacted) data; None when it could not be screened."""
        if not data:
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if content_type in _TEXT_TYPES:
            try:
                value = json_fast.loads(text)
            except (ValueError, RecursionError):
                return None
            out = scan.value(value)
            return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode() if scan.redacting else None
        if content_type.startswith("text/"):
            out_text = scan.text(text)
            return out_text.encode() if scan.redacting else None
        return None


def output_screen_layer(
    capabilities: Iterable[agent_pb2.Capability], classify: Classifier = DEFAULT_CLASSIFIER
) -> OutputScreenLayer | None:
    """The layer for the capabilities that ask for an output screen; None when none does (it costs nothing)."""
    actions = {c.name: int(c.output_screen) for c in capabilities if c.output_screen}
    return OutputScreenLayer(actions, classify) if actions else None


__all__ = ["DEFAULT_CLASSIFIER", "NOTE", "Classifier", "OutputScreenLayer", "PatternClassifier", "Span",
           "luhn_ok", "output_screen_layer", "redact"]
