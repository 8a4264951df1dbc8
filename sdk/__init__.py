"""hivemesh SDK: write an agent in a few lines, call the mesh from any Python program.

    from hivemesh.sdk import Agent, capability, serve, MeshClient
"""

from hivemesh.mesh.errors import (
    AgentError,
    DeadlineExceededError,
    GrantDeniedError,
    HivemeshError,
    InvalidInputError,
    NoLiveInstanceError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ScopeMissingError,
    UnauthenticatedError,
    UnknownCapabilityError,
)
from hivemesh.mesh.settings import MeshSettings
from hivemesh.sdk.agent import Agent, CapabilitySpec, capability
from hivemesh.sdk.client import CallResult, MeshClient
from hivemesh.sdk.context import Context
from hivemesh.sdk.serve import AgentServer, run, serve, serve_until_signal

__all__ = [
    "Agent",
    "AgentError",
    "AgentServer",
    "CallResult",
    "CapabilitySpec",
    "Context",
    "DeadlineExceededError",
    "GrantDeniedError",
    "HivemeshError",
    "InvalidInputError",
    "MeshClient",
    "MeshSettings",
    "NoLiveInstanceError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ScopeMissingError",
    "UnauthenticatedError",
    "UnknownCapabilityError",
    "capability",
    "run",
    "serve",
    "serve_until_signal",
]
