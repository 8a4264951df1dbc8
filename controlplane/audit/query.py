"""Which entries of the control plane's audit log a query wants."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from hivemesh.mesh.audit.record import DECISIONS, parse_time
from hivemesh.mesh.errors import InvalidInputError

NODE_KINDS: Final = frozenset({"inbound", "outbound", "handshake", "shadow"})
"""What a node's records are about (`hivemesh.mesh.audit`): a call it decided on, a call it refused on the way out
or a signed answer it verified, a TLS handshake refused below gRPC, a shadow call whose answer differed."""
CONTROLPLANE_KINDS: Final = frozenset({"controlplane"})
"""Kinds only the control plane writes (`AuditStore.record`; its own handshake records are `handshake`): a shipped
record claiming one is refused, or a workload could pass its records off as the control plane's."""
KINDS: Final = NODE_KINDS | CONTROLPLANE_KINDS
"""Every kind a query may filter on."""
MAX_FILTER_BYTES: Final = 1024
"""The longest text filter a query takes: a glob is translated to a regex in time quadratic in its length on the
control plane's event loop (20,000 '[' held it 9 s), and no identity, capability or time needs more."""
_TEXT_FILTERS: Final = ("caller", "capability", "principal", "agent", "jti", "trace_id")
_GLOBS: Final = ("caller", "capability", "principal", "agent")


def _check_length(name: str, value: str) -> None:
    if len(value) > MAX_FILTER_BYTES or len(value.encode("utf-8", "surrogatepass")) > MAX_FILTER_BYTES:
        msg = f"{name} is longer than {MAX_FILTER_BYTES} bytes"
        raise InvalidInputError(msg, field_violations={name: msg})


@dataclass(frozen=True)
class AuditFilter:
    """Which entries a query wants; every given field must match (globs for identities and capabilities)."""

    caller: str = ""
    capability: str = ""
    decision: str = ""
    principal: str = ""
    agent: str = ""
    jti: str = ""
    trace_id: str = ""
    kind: str = ""
    since: float | None = None
    until: float | None = None
    after_seq: int = 0
    _globs: dict[str, re.Pattern[str]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.decision and self.decision not in DECISIONS:
            msg = f"decision must be one of {', '.join(sorted(DECISIONS))}"
            raise InvalidInputError(msg, field_violations={"decision": msg})
        if self.kind and self.kind not in KINDS:
            msg = f"kind must be one of {', '.join(sorted(KINDS))}"
            raise InvalidInputError(msg, field_violations={"kind": msg})
        for name in _TEXT_FILTERS:
            _check_length(name, getattr(self, name))
        for name in _GLOBS:
            value = getattr(self, name)
            if value:
                self._globs[name] = re.compile(fnmatch.translate(value))

    @classmethod
    def from_strings(cls, *, since: str = "", until: str = "", **kwargs: Any) -> AuditFilter:
        """The filter from a request's strings; INVALID_ARGUMENT naming the field for a bad or too long one."""
        return cls(since=_time_filter("since", since), until=_time_filter("until", until), **kwargs)

    def matches(self, entry: Mapping[str, Any]) -> bool:
        if entry.get("seq", 0) <= self.after_seq:
            return False
        rec = entry.get("record")
        if not isinstance(rec, dict):
            return False
        fields = {"caller": rec.get("caller", ""), "capability": rec.get("capability", ""),
                  "principal": rec.get("principal", ""), "agent": rec.get("node", "")}
        for name, pattern in self._globs.items():
            if not pattern.fullmatch(str(fields[name] or "")):
                return False
        if self.decision and rec.get("decision") != self.decision:
            return False
        if self.jti and rec.get("jti") != self.jti:
            return False
        if self.trace_id and rec.get("trace_id") != self.trace_id:
            return False
        if self.kind and rec.get("kind") != self.kind:
            return False
        if self.since is not None or self.until is not None:
            try:
                t = parse_time(str(rec.get("time", "")))
            except ValueError:
                return False
            if self.since is not None and t < self.since:
                return False
            if self.until is not None and t > self.until:
                return False
        return True


def _time_filter(name: str, text: str) -> float | None:
    """since/until as unix seconds (None when not given); parse_time's message quotes a bounded part of text."""
    if not text:
        return None
    _check_length(name, text)
    try:
        return parse_time(text)
    except ValueError as exc:
        raise InvalidInputError(f"{name}: {exc}", field_violations={name: str(exc)}) from None
