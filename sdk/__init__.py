"""hivemesh SDK: write an agent in a few lines, call the mesh from any Python program.

    from hivemesh.sdk import Agent, capability, serve, MeshClient
    from hivemesh.sdk import Pipeline, FanOut, Supervisor, PeerReview, Router, Handoff, WorkflowEngine
    from hivemesh.sdk import tool, mesh_tools, run_with_tools   # models calling tools (hivemesh.sdk.tools)
"""

from hivemesh.mesh.budget import TokenBudgets
from hivemesh.mesh.errors import (
    AgentError,
    CircuitOpenError,
    DeadlineExceededError,
    DepthExceededError,
    GrantDeniedError,
    HivemeshError,
    InvalidInputError,
    InvalidOutputError,
    LoopDetectedError,
    NoLiveInstanceError,
    OverloadedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitedError,
    ScopeMissingError,
    TaskRejectedError,
    TokenBudgetExceededError,
    UnauthenticatedError,
    UnknownCapabilityError,
)
from hivemesh.mesh.settings import MeshSettings
from hivemesh.sdk.agent import Agent, CapabilitySpec, capability
from hivemesh.sdk.call_options import CallOptions
from hivemesh.sdk.client import CallResult, MeshClient
from hivemesh.sdk.context import Context
from hivemesh.sdk.escalation import EscalationClient, InputRequired
from hivemesh.sdk.llm import LLM, OpenAICompatibleLLM, RuleBasedLLM, llm_from_env
from hivemesh.sdk.patterns import (
    Branch,
    EscalationRules,
    FanOut,
    Handoff,
    PatternResult,
    PeerReview,
    Pipeline,
    Router,
    Rule,
    Step,
    Subtask,
    Supervisor,
    handoff,
)
from hivemesh.sdk.serve import AgentServer, AgentServerConfig, run, run_main, serve, serve_until_signal
from hivemesh.sdk.tools import Tool, mesh_tools, run_with_tools, tool
from hivemesh.sdk.workflow import WorkflowEngine, WorkflowState

__all__ = [
    "LLM",
    "Agent",
    "AgentError",
    "AgentServer",
    "AgentServerConfig",
    "Branch",
    "CallOptions",
    "CallResult",
    "CapabilitySpec",
    "CircuitOpenError",
    "Context",
    "DeadlineExceededError",
    "DepthExceededError",
    "EscalationClient",
    "EscalationRules",
    "FanOut",
    "GrantDeniedError",
    "Handoff",
    "HivemeshError",
    "InputRequired",
    "InvalidInputError",
    "InvalidOutputError",
    "LoopDetectedError",
    "MeshClient",
    "MeshSettings",
    "NoLiveInstanceError",
    "OpenAICompatibleLLM",
    "OverloadedError",
    "PatternResult",
    "PayloadTooLargeError",
    "PeerReview",
    "PermissionDeniedError",
    "Pipeline",
    "RateLimitedError",
    "Router",
    "Rule",
    "RuleBasedLLM",
    "ScopeMissingError",
    "Step",
    "Subtask",
    "Supervisor",
    "TaskRejectedError",
    "TokenBudgetExceededError",
    "TokenBudgets",
    "Tool",
    "UnauthenticatedError",
    "UnknownCapabilityError",
    "WorkflowEngine",
    "WorkflowState",
    "capability",
    "handoff",
    "llm_from_env",
    "mesh_tools",
    "run",
    "run_main",
    "run_with_tools",
    "serve",
    "serve_until_signal",
    "tool",
]
