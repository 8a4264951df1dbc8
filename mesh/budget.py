"""Per-caller token budgets, enforced where tokens are spent: at the inbound side of the agent that runs the model.

A budget rule says how many model tokens (input + output, as counted in `InvokeResponse.usage`) the callers
matching `subjects` may spend on the capabilities matching `capabilities` per window:

    {"kind": "budgets", "name": "demo", "spec": {"rules": [
        {"subjects": ["spiffe://hivemesh.local/client/*"], "capabilities": ["summarize", "draft-*"],
         "max_tokens": 20000, "window_seconds": 3600}]}}

The documents are a policy kind (`budgets`) of the policy framework (`hivemesh.mesh.policy`): stored under
`/hivemesh/policies/budgets/<name>`, applied with the policy CLI, mirrored and compiled by every node. The
inbound chain's budget layer (`hivemesh.mesh.layers.budget`), in both packagings (SDK server and sidecar),
checks the caller's spend before the call (RESOURCE_EXHAUSTED / TOKEN_BUDGET_EXCEEDED when spent) and charges
the `usage` of the response after it, in fixed windows. With a `SpendLedger` (what the front door uses for the
`budgets` policies) the spend of every replica counts (`hivemesh.mesh.budget_ledger`); without one, spend is
counted per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from hivemesh.mesh.errors import TokenBudgetExceededError
from hivemesh.mesh.globs import Globs
from hivemesh.mesh.policy import PolicyKind

if TYPE_CHECKING:
    from hivemesh.mesh.budget_ledger import SpendLedger

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
    _subjects: Globs = field(init=False, repr=False, compare=False)
    _capabilities: Globs = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.subjects or not self.capabilities:
            raise ValueError("a budget rule needs at least one subject and one capability glob")
        if self.max_tokens < 0 or self.window_s < 1:
            raise ValueError("max_tokens must be >= 0 and window_s >= 1")
        object.__setattr__(self, "_subjects", Globs(self.subjects))
        object.__setattr__(self, "_capabilities", Globs(self.capabilities))

    def applies(self, subject: str, capability: str) -> bool:
        return self._subjects.match(subject) and self._capabilities.match(capability)


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


def _compile(docs: Mapping[str, Any]) -> BudgetTable:
    return BudgetTable.from_specs({name: doc.spec for name, doc in docs.items()})


BUDGETS: Final[PolicyKind[BudgetTable]] = PolicyKind(
    name=KIND_NAME,
    spec_schema=SPEC_SCHEMA,
    compile=_compile,
    description="per-caller model token budgets, enforced by the agents that spend the tokens",
)


class TokenBudgets:
    """Spend per (rule, caller, window) in this process, checked against the table in force.

    Args:
        table: the rules, or a zero-argument function returning the current ones (a policy cache's view).
        clock: seconds (time.time); windows are aligned to multiples of window_s.
    """

    def __init__(
        self,
        table: BudgetTable | Callable[[], BudgetTable],
        *,
        clock: Callable[[], float] = time.time,
        ledger: SpendLedger | None = None,
    ) -> None:
        self._table: Callable[[], BudgetTable] = table if callable(table) else (lambda: table)
        self._clock = clock
        self._spent: dict[tuple[str, str, int], int] = {}
        self.ledger = ledger
        """Shares spend with the other replicas (None: this process's spend only)."""

    def _total(self, key: tuple[str, str, int]) -> int:
        own = self._spent.get(key, 0)
        return own + self.ledger.others(key) if self.ledger is not None else own

    def _windows(self, subject: str, capability: str) -> list[tuple[BudgetRule, tuple[str, str, int]]]:
        rules = self._table().rules
        if not rules:  # the common case, on every call: no budgets at all
            return []
        now = self._clock()
        return [(r, (r.name, subject, int(now // r.window_s))) for r in rules if r.applies(subject, capability)]

    def spent(self, subject: str, capability: str) -> dict[str, int]:
        """Tokens spent in the current window of every rule that applies (rule name → tokens)."""
        return {rule.name: self._total(key) for rule, key in self._windows(subject, capability)}

    def check(self, subject: str, capability: str) -> bool:
        """Raise TokenBudgetExceededError if any applicable rule's budget for this window is spent; else return
        whether any rule applies (so the call's usage must be charged after it)."""
        windows = self._windows(subject, capability)
        for rule, key in windows:
            spent = self._total(key)
            if spent >= rule.max_tokens:
                retry = rule.window_s - (self._clock() % rule.window_s)
                raise TokenBudgetExceededError(
                    f"{subject} spent {spent} of {rule.max_tokens} tokens allowed per {rule.window_s} s "
                    f"by budget {rule.name}",
                    metadata={"budget": rule.name, "spent": str(spent), "max_tokens": str(rule.max_tokens)},
                    retry_after_s=round(retry, 3),
                )
        return bool(windows)

    def charge(self, subject: str, capability: str, tokens: int) -> None:
        if tokens <= 0:
            return
        windows = self._windows(subject, capability)
        for rule, key in windows:
            total = self._spent[key] = self._spent.get(key, 0) + tokens
            if self.ledger is not None:
                self.ledger.publish(key, total, (key[2] + 1) * rule.window_s)
        if len(self._spent) > 10_000:  # drop past windows
            current = {key for _r, key in windows}
            now = self._clock()
            rules = {r.name: r for r in self._table().rules}
            self._spent = {k: v for k, v in self._spent.items()
                           if k in current or (k[0] in rules and k[2] == int(now // rules[k[0]].window_s))}
