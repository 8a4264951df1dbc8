"""Option values that are not finite positive ints (NaN passes every `<` check) are refused at construction."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest

from hivemesh.sdk.idempotency import IdempotencyCache
from hivemesh.sdk.memory import Memory
from hivemesh.sdk.state import StateClient
from hivemesh.sdk.workflow import WorkflowEngine


@pytest.mark.parametrize("ttl", [math.nan, 2.5, math.inf, 1, 10**9, True])
def test_lock_ttl_must_be_an_int_of_seconds_in_range(ttl: Any) -> None:
    with pytest.raises(ValueError, match="lock_ttl_s"):
        WorkflowEngine(cast(Any, None), lock_ttl_s=ttl)
    assert WorkflowEngine(cast(Any, None), lock_ttl_s=2).lock_ttl_s == 2


@pytest.mark.parametrize(("entries", "ttl"), [(math.nan, 1.0), (1, math.nan), (2.5, 1.0), (1, math.inf), (0, 1.0)])
def test_idempotency_cache_options_must_be_finite_and_positive(entries: Any, ttl: Any) -> None:
    with pytest.raises(ValueError):
        IdempotencyCache(max_entries=entries, ttl_s=ttl)


@pytest.mark.parametrize(("turns", "size"), [(math.nan, 1024), (1, math.nan), (2.5, 1024), (0, 1024)])
def test_memory_bounds_must_be_ints(turns: Any, size: Any) -> None:
    with pytest.raises(ValueError):
        Memory(StateClient(cast(Any, None)), "memory/x/c/y", max_turns=turns, max_bytes=size)


@pytest.mark.parametrize("deadline", [0, -30, math.nan, math.inf, 1e30])
def test_escalation_rules_refuse_a_deadline_the_service_would_not_take(deadline: float) -> None:
    """Refused where the rules are made (a policy document, a Supervisor's construction), not by the first
    escalation in the middle of a run."""
    from hivemesh.sdk.patterns.supervisor import EscalationRules

    with pytest.raises(ValueError, match="deadline_s"):
        EscalationRules(deadline_s=deadline)
    assert EscalationRules(deadline_s=None).deadline_s is None and EscalationRules(deadline_s=60).deadline_s == 60
