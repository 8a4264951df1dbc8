"""Registered nodes a CA rotation would strand: those still presenting a certificate the signing root did not
issue. `ca rotate --step finish` refuses while there is one (naming each), and `ca status` lists them.

Each registered instance says which root issued its current certificate (`hivemesh.mesh.cert_presence`
labels, refreshed at every renewal). After `activate` every node renews at once, so a node still naming the old
root (or naming none: it predates these labels) has not renewed, and dropping the old root would cut it off.
Nodes that only call (clients, not registered) are not tracked; their next renewal moves them to the new root.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hivemesh.mesh.cert_presence import CERT_NOT_AFTER_LABEL, CERT_ROOT_LABEL
from hivemesh.mesh.errors import FailedPreconditionError
from hivemesh.v1 import mesh_pb2

_NAMED = 10
"""How many stragglers a refusal names (the count is always complete)."""


@dataclass(frozen=True)
class Straggler:
    agent: str
    instance_id: str
    identity: str
    endpoint: str
    root: str
    """Fingerprint of the root that issued its certificate ("" when the entry does not say)."""
    not_after: int

    def describe(self) -> str:
        root = f"a certificate from root {self.root[:16]}…" if self.root else "no certificate root (not renewed)"
        return f"{self.agent}/{self.instance_id} ({self.identity or '?'} at {self.endpoint}) presents {root}"


def stragglers(instances: Iterable[mesh_pb2.AgentInstance], signing_root: str) -> list[Straggler]:
    """The registered instances whose certificate the signing root did not issue, sorted by agent/instance."""
    out = []
    for inst in instances:
        root = inst.labels.get(CERT_ROOT_LABEL, "")
        if root == signing_root:
            continue
        try:
            not_after = int(inst.labels.get(CERT_NOT_AFTER_LABEL, "0"))
        except ValueError:
            not_after = 0
        out.append(Straggler(inst.card.name, inst.instance_id, inst.identity, inst.endpoint, root, not_after))
    return sorted(out, key=lambda s: (s.agent, s.instance_id))


def refuse_if_stranding(instances: Iterable[mesh_pb2.AgentInstance], signing_root: str) -> None:
    """FailedPreconditionError naming the nodes that dropping every other root would cut off, if any."""
    found = stragglers(instances, signing_root)
    if not found:
        return
    named = "; ".join(s.describe() for s in found[:_NAMED])
    more = f"; and {len(found) - _NAMED} more" if len(found) > _NAMED else ""
    raise FailedPreconditionError(
        f"cannot finish: {len(found)} registered node(s) have not renewed onto the new root, and dropping the old "
        f"one would cut them off: {named}{more}. Wait for them to renew, or stop them, then finish "
        "(`hivemesh ca status` lists them)",
        metadata={"stragglers": " ".join(f"{s.agent}/{s.instance_id}" for s in found)[:256]},
    )
