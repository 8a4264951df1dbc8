"""Per-caller token budgets, enforced where tokens are spent: in the SDK server of the agent that runs the model.

A budget rule says how many model tokens (input + output, as counted in `InvokeResponse.usage`) the callers
matching `subjects` may spend on the capabilities matching `capabilities` per window:

    {"kind": "budgets", "name": "demo", "spec": {"rules": [
        {"subjects": ["spiffe://hivemesh.local/client/*"], "capabilities": ["summarize", "draft-*"],
         "max_tokens": 20000, "window_seconds": 3600}]}}

The documents are a policy kind (`budgets`, declared in `hivemesh.mesh.budget_kind`): stored under
`/hivemesh/policies/budgets/<name>`, applied with the policy CLI, mirrored and compiled by every node. An
agent checks the caller's spend before running a capability (RESOURCE_EXHAUSTED / TOKEN_BUDGET_EXCEEDED when
spent) and charges the call's usage after, in fixed windows. With a `SpendLedger` (what an AgentServer uses for
the `budgets` policies) the spend of every replica counts (`hivemesh.sdk.budget_ledger`); without one, spend
is counted per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from hivemesh.mesh.budget_kind import BudgetRule, BudgetTable
from hivemesh.mesh.errors import TokenBudgetExceededError

if TYPE_CHECKING:
    from hivemesh.sdk.budget_ledger import SpendLedger


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
        now = self._clock()
        return [(r, (r.name, subject, int(now // r.window_s))) for r in self._table().rules
                if r.applies(subject, capability)]

    def spent(self, subject: str, capability: str) -> dict[str, int]:
        """Tokens spent in the current window of every rule that applies (rule name → tokens)."""
        return {rule.name: self._total(key) for rule, key in self._windows(subject, capability)}

    def check(self, subject: str, capability: str) -> None:
        """Raise TokenBudgetExceededError if any applicable rule's budget for this window is spent."""
        for rule, key in self._windows(subject, capability):
            spent = self._total(key)
            if spent >= rule.max_tokens:
                retry = rule.window_s - (self._clock() % rule.window_s)
                raise TokenBudgetExceededError(
                    f"{subject} spent {spent} of {rule.max_tokens} tokens allowed per {rule.window_s} s "
                    f"by budget {rule.name}",
                    metadata={"budget": rule.name, "spent": str(spent), "max_tokens": str(rule.max_tokens)},
                    retry_after_s=round(retry, 3),
                )

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
