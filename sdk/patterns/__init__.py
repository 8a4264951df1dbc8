"""Multi-agent orchestration patterns, each a composable object that runs over a `MeshClient`, inside an
agent over its `Context`, or durably under a workflow (`hivemesh.sdk.workflow`).

    from hivemesh.sdk.patterns import Pipeline, Step, FanOut, Supervisor, Subtask, PeerReview, Router, Handoff

    result = await FanOut(["search-papers", "search-news"], aggregate=merge).run(mesh, {"query": "..."})
"""

from hivemesh.sdk.patterns.base import (
    TERMINAL,
    Caller,
    DirectRunner,
    PatternResult,
    Runner,
    StepResult,
    as_runner,
    call_with_escalation,
    state_name,
)
from hivemesh.sdk.patterns.fanout import Branch, FanOut, FanOutError
from hivemesh.sdk.patterns.handoff import Handoff, handoff
from hivemesh.sdk.patterns.peer import PeerReview
from hivemesh.sdk.patterns.pipeline import Pipeline, PipelineContext, Step
from hivemesh.sdk.patterns.router import Embedder, HashingEmbedder, Router, Rule, load_embedder
from hivemesh.sdk.patterns.scope import ScopedRunner, scoped
from hivemesh.sdk.patterns.supervisor import EscalationRules, Review, Subtask, Supervisor

__all__ = [
    "TERMINAL",
    "Branch",
    "Caller",
    "DirectRunner",
    "Embedder",
    "EscalationRules",
    "FanOut",
    "FanOutError",
    "Handoff",
    "HashingEmbedder",
    "PatternResult",
    "PeerReview",
    "Pipeline",
    "PipelineContext",
    "Review",
    "Router",
    "Rule",
    "Runner",
    "ScopedRunner",
    "Step",
    "StepResult",
    "Subtask",
    "Supervisor",
    "as_runner",
    "call_with_escalation",
    "handoff",
    "load_embedder",
    "scoped",
    "state_name",
]
