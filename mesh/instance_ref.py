"""What names one registered instance inside a node's memory: its agent and its instance id together.

An instance id is unique only under its agent (the registry keys an entry by both, `registry.agent_key`):
two agents may each run an instance named "worker-1", and a workload may name its own instance as it likes.
So every per-instance memory of a node (tried sets, suspicions, breakers, outstanding counts, affinity
weights) keys by this, or a failed instance of one agent would rule out a healthy one of another.
"""

from __future__ import annotations

from typing import Protocol


class _Card(Protocol):
    @property
    def name(self) -> str: ...


class Registered(Protocol):
    """What an instance key is read from (`mesh_pb2.AgentInstance`)."""

    @property
    def instance_id(self) -> str: ...

    @property
    def card(self) -> _Card: ...


def instance_key(inst: Registered) -> str:
    """"agent/instance id", as the instance's registry key ends: unique in the mesh, readable in `hivemesh status`."""
    return f"{inst.card.name}/{inst.instance_id}"
