"""What an instance's card declares about one capability (idempotent, signed payloads), read once per entry.

Every outbound call asks both questions of the instance it picked. Scanning the card's capabilities builds a
protobuf wrapper per entry each time; the registry hands out the same instance object until the entry changes
(a changed entry is a new object), so the answers are kept per object and a changed card is read afresh.
"""

from __future__ import annotations

from typing import NamedTuple

from hivemesh.v1 import mesh_pb2

_MAX_INSTANCES = 1024
"""Instance objects remembered at most; past that the memory starts over (old objects are dropped with it)."""


class CapabilityFlags(NamedTuple):
    idempotent: bool
    """Safe to run twice (`Capability.idempotent`)."""
    signed: bool
    """Requests and answers are signed (`Capability.signed_payloads`)."""


_NONE = CapabilityFlags(idempotent=False, signed=False)
_seen: dict[int, tuple[mesh_pb2.AgentInstance, dict[str, CapabilityFlags]]] = {}
"""id(instance) -> (that very instance, kept so its id cannot be reused meanwhile; capability -> flags)."""


def _read(instance: mesh_pb2.AgentInstance) -> dict[str, CapabilityFlags]:
    flags: dict[str, CapabilityFlags] = {}
    for c in instance.card.capabilities:
        seen = flags.get(c.name, _NONE)  # a name listed twice: either declaration counts
        flags[c.name] = CapabilityFlags(idempotent=seen.idempotent or c.idempotent,
                                        signed=seen.signed or c.signed_payloads)
    return flags


def capability_flags(instance: mesh_pb2.AgentInstance, capability: str) -> CapabilityFlags:
    """What instance's card declares for capability (both False when the card does not list it)."""
    entry = _seen.get(id(instance))
    if entry is None or entry[0] is not instance:
        if len(_seen) >= _MAX_INSTANCES:
            _seen.clear()
        entry = _seen[id(instance)] = (instance, _read(instance))
    return entry[1].get(capability, _NONE)


__all__ = ["CapabilityFlags", "capability_flags"]
