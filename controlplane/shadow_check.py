"""Policy validation that needs the registry: a `routes` shadow may mirror only idempotent capabilities.

A mirrored call runs the request a second time on the candidate, so a capability with real effects (a charge,
an email) must not be mirrored unless the shadow is a sandbox (`shadow.sandbox: true`: the candidate has no
real effects). The idempotency of a capability is what its live instances declare in their cards; a routes
document whose non-sandbox shadow targets a capability any live instance declares non-idempotent is refused.
(Nodes enforce the same rule per call, for capabilities that register later: hivemesh.mesh.outbound.shadow.)
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any

from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.keyspace import AGENTS
from hivemesh.mesh.policy import PolicyDoc
from hivemesh.v1.mesh_pb2 import AgentInstance


def non_idempotent(instances: Iterable[AgentInstance]) -> set[str]:
    """Capabilities some instance declares non-idempotent."""
    return {c.name for i in instances for c in i.card.capabilities if not c.idempotent}


def unsafe_shadow(doc: PolicyDoc, unsafe: set[str]) -> str | None:
    """The first non-idempotent capability doc's non-sandbox shadow would mirror, if any."""
    shadow = doc.spec.get("shadow")
    if doc.kind != "routes" or shadow is None or shadow.get("sandbox", False):
        return None
    for pattern in doc.spec.get("capabilities", ["*"]):
        rx = re.compile(fnmatch.translate(pattern))
        for cap in sorted(unsafe):
            if rx.fullmatch(cap):
                return cap
    return None


async def refuse_unsafe_shadows(etcd: Any, docs: Sequence[PolicyDoc]) -> None:
    """Raise InvalidInputError (naming the field) for a routes shadow of a non-idempotent capability."""
    if not any(d.kind == "routes" and "shadow" in d.spec for d in docs):
        return
    instances = []
    for kv in await etcd.get_prefix(AGENTS.encode()):
        try:
            instances.append(AgentInstance.FromString(kv.value))
        except Exception:  # noqa: BLE001 - an undecodable entry declares nothing
            continue
    unsafe = non_idempotent(instances)
    for doc in docs:
        cap = unsafe_shadow(doc, unsafe)
        if cap is not None:
            msg = (f"{cap!r} is not idempotent (a live instance declares so): mirroring would run its effect twice; "
                   "mirror only idempotent capabilities, or mark the shadow `sandbox: true` if the candidate has no "
                   "real effects")
            raise InvalidInputError(f"routes/{doc.name}: spec.shadow: {msg}",
                                    field_violations={"spec.shadow": msg})
