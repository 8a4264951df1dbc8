"""What a pattern is handed while it runs (its input, what the caller's own functions return) gets a clear error
naming what was wrong, over the real mesh. Before, each failed with a raw Python error from deep inside the pattern
(`cannot convert dictionary update sequence element #0`, `'int' object has no attribute 'to_json'`), or not at
all (a stop_if returning True ended the run REJECTED with the reason True)."""

from __future__ import annotations

from typing import Any

import pytest

from hivemesh.sdk import Agent, capability
from hivemesh.sdk.patterns import EscalationRules, Handoff, Pipeline, Router, Step, Subtask, Supervisor
from tests.support.orch_agents import DeskAgent, WorkerAgent
from tests.support.orch_env import Orch

pytestmark = pytest.mark.timeout(90)


class _Desk(Agent):
    """Answers a conversation with the context it was handed, and counts its calls."""

    name = "arg-desk"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    @capability(name="arg-desk-chat", description="Reply to a conversation", idempotent=True)
    async def chat(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return {"reply": "hello", "seen": req["conversation"]["context"]}


async def test_a_handoff_context_that_is_no_object_is_refused_before_anyone_is_called(orch: Orch) -> None:
    desk = _Desk()
    await orch.serve(desk)
    chat = Handoff("arg-desk-chat")
    with pytest.raises(ValueError, match=r"its context must be an object, not list \[1, 2\]$"):
        await chat.run(orch.mesh, {"message": "hi", "context": [1, 2]})
    with pytest.raises(ValueError, match=r"its context must be an object, not str 'abc'$"):
        await chat.run(orch.mesh, {"message": "hi", "context": "abc"})
    with pytest.raises(ValueError, match=r"conversation_id must be a str, not int 5$"):
        await chat.run(orch.mesh, {"message": "hi", "conversation_id": 5})
    assert desk.calls == 0
    done = await chat.run(orch.mesh, {"message": "hi", "context": {"user": "ana"}})
    assert done.output["seen"] == {"user": "ana"} and desk.calls == 1


async def test_a_supervisor_names_a_decompose_or_review_function_that_returned_the_wrong_thing(orch: Orch) -> None:
    await orch.serve(DeskAgent())
    rules = EscalationRules(tiers=(), min_confidence=None)
    with pytest.raises(TypeError, match=r"^decompose returned int 1 as subtask 0, not a Subtask$"):
        await Supervisor(lambda _t: [1, 2], rules=rules).run(orch.mesh, {})
    one = Subtask("q1", "answer", {"question": "q"})
    with pytest.raises(TypeError, match=r"^decompose's result must be a list of Subtask objects, not Subtask "):
        await Supervisor(lambda _t: one, rules=rules).run(orch.mesh, {})
    reviewed = Supervisor(lambda _t: [one], review=lambda _s, _o: {"approved": True}, rules=rules)
    with pytest.raises(TypeError, match=r"^the review function returned dict \{'approved': True\} for subtask q1, "
                                        r"not a Review"):
        await reviewed.run(orch.mesh, {})


async def test_a_router_text_or_stop_if_function_giving_no_str_is_a_clear_error(orch: Orch) -> None:
    worker = WorkerAgent()
    await orch.serve(worker)
    with pytest.raises(TypeError, match=r"^the router's text function returned int 5, not a str"):
        await Router(text=lambda _r: 5).run(orch.mesh, {"text": "upper case this"})
    stops = Pipeline([Step("upper", stop_if=lambda _out: True), Step("summarize")])
    with pytest.raises(TypeError, match=r"^step upper stop_if returned bool True, not a reason to stop \(a str\)"):
        await stops.run(orch.mesh, {"text": "a b"})
    going = await Pipeline([Step("upper", stop_if=lambda _out: None), Step("summarize")]).run(
        orch.mesh, {"text": "a b"})
    assert going.state == "COMPLETED" and going.output == {"text": "A B"}
