"""The `budgets` policy kind: per-caller model token budgets, as documents and as the compiled rule table.

    {"kind": "budgets", "name": "demo", "spec": {"rules": [
        {"subjects": ["spiffe://hivemesh.local/client/*"], "capabilities": ["summarize", "draft-*"],
         "max_tokens": 20000, "window_seconds": 3600}]}}

Only the declaration lives here, outside the SDK, so the control plane's policy store can validate budgets
without importing the SDK; the SDK server enforces them (`hivemesh.sdk.budget.TokenBudgets`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from hivemesh.mesh.policy import PolicyDoc, PolicyKind

KIND_NAME: Final = "budgets"

_GLOBS = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1, "maxLength": 512}}
SPEC_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["rules"],
    "additionalProperties": False,
    "properties": {
        "rules": {
            "type": "array",
            "minItems": 1,
            "maxItems": 256,
            "items": {
                "type": "object",
                "required": ["subjects", "max_tokens"],
                "additionalProperties": False,
                "properties": {
                    "subjects": _GLOBS,
                    "capabilities": _GLOBS,
                    "max_tokens": {"type": "integer", "minimum": 0},
                    "window_seconds": {"type": "integer", "minimum": 1, "maximum": 31 * 86400},
                },
            },
        }
    },
}


@dataclass(frozen=True)
class BudgetRule:
    """max_tokens per window_s for callers matching subjects on capabilities matching capabilities."""

    name: str
    subjects: tuple[str, ...]
    capabilities: tuple[str, ...] = ("*",)
    max_tokens: int = 0
    window_s: int = 3600
    _subject_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _capability_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.subjects or not self.capabilities:
            raise ValueError("a budget rule needs at least one subject and one capability glob")
        if self.max_tokens < 0 or self.window_s < 1:
            raise ValueError("max_tokens must be >= 0 and window_s >= 1")
        object.__setattr__(self, "_subject_re", re.compile("|".join(fnmatch.translate(s) for s in self.subjects)))
        object.__setattr__(self, "_capability_re",
                           re.compile("|".join(fnmatch.translate(c) for c in self.capabilities)))

    def applies(self, subject: str, capability: str) -> bool:
        return bool(self._subject_re.match(subject)) and bool(self._capability_re.match(capability))


@dataclass(frozen=True)
class BudgetTable:
    """The compiled budgets: every rule of every document, in (document name, position) order."""

    rules: tuple[BudgetRule, ...] = ()

    @classmethod
    def from_specs(cls, specs: Mapping[str, Mapping[str, Any]]) -> BudgetTable:
        rules: list[BudgetRule] = []
        for name in sorted(specs):
            for i, raw in enumerate(specs[name].get("rules", [])):
                rules.append(BudgetRule(
                    name=f"{name}[{i}]",
                    subjects=tuple(raw["subjects"]),
                    capabilities=tuple(raw.get("capabilities", ["*"])),
                    max_tokens=int(raw["max_tokens"]),
                    window_s=int(raw.get("window_seconds", 3600)),
                ))
        return cls(tuple(rules))


def _compile(docs: Mapping[str, PolicyDoc]) -> BudgetTable:
    return BudgetTable.from_specs({name: doc.spec for name, doc in docs.items()})


BUDGETS: Final[PolicyKind[BudgetTable]] = PolicyKind(
    name=KIND_NAME,
    spec_schema=SPEC_SCHEMA,
    compile=_compile,
    description="per-caller model token budgets, enforced by the agents that spend the tokens",
)
