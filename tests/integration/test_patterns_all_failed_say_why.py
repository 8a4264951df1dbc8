"""A pattern whose every branch (or subtask) failed says why in its error, not only in its details: a new user saw
`only 0 of 3 branches answered (failed: search-news, search-papers, search-wiki)`, while the cause (a grant an
operator gives with `hivemesh allow ...`, an input the capabilities refuse) was only in `e.failed`. Real mesh:
agents, mutual TLS, tokens, etcd."""

from __future__ import annotations

import pytest

from hivemesh.sdk.patterns import EscalationRules, FanOut, FanOutError, Subtask, Supervisor
from hivemesh.sdk.patterns.base import MAX_WHY_CHARS, why_failed
from tests.support.orch_agents import WorkerAgent
from tests.support.orch_env import Orch

pytestmark = pytest.mark.timeout(90)


async def test_fanout_with_every_branch_failed_names_the_first_failures_code_and_message(orch: Orch) -> None:
    await orch.serve(WorkerAgent())
    with pytest.raises(FanOutError) as refused:  # an input both capabilities' schemas refuse
        await FanOut(["upper", "summarize"], branch_timeout=5).run(orch.mesh, {"text": 5})
    message = refused.value.message
    assert message.startswith("only 0 of 2 branches answered (failed: summarize, upper); "), message
    first = next(b for b in ("upper", "summarize") if f"; {b}: INVALID_ARGUMENT/INVALID_INPUT: " in message)
    assert refused.value.failed[first]["message"][:60] in message
    assert (refused.value.code.name, refused.value.reason) == ("INVALID_ARGUMENT", "INVALID_INPUT")

    with pytest.raises(FanOutError) as broken:
        await FanOut(["broken", "upper"], min_success=2, branch_timeout=5).run(orch.mesh, {"text": "x"})
    assert broken.value.message.startswith("only 1 of 2 branches answered (failed: broken); broken: "
                                           "INTERNAL/AGENT_ERROR: "), broken.value.message
    assert "broken on purpose" in broken.value.message


async def test_supervisor_with_a_failed_subtask_says_why_in_its_reason(orch: Orch) -> None:
    await orch.serve(WorkerAgent())
    quiet = Supervisor(lambda _t: [Subtask("s", "broken", {"text": "x"})], rules=EscalationRules(max_errors=None))
    failed = await quiet.run(orch.mesh, {})
    assert failed.state == "FAILED" and failed.details["failed"] == ["s"]
    assert failed.reason.startswith("failed: s; s: INTERNAL/AGENT_ERROR: "), failed.reason
    assert "broken on purpose" in failed.reason


def test_the_reason_repeated_is_bounded() -> None:
    long = why_failed({"code": "PERMISSION_DENIED", "reason": "GRANT_DENIED", "message": "x" * 5000})
    assert long.startswith("PERMISSION_DENIED/GRANT_DENIED: x") and long.endswith("…")
    assert len(long) == len("PERMISSION_DENIED/GRANT_DENIED: ") + MAX_WHY_CHARS
