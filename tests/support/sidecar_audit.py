"""What the answer-size tests of a plain agent behind a sidecar read of it: the bytes its hop adds to an answer,
and its audit records of one caller's inbound calls."""

from __future__ import annotations

import json
from typing import Any

from hivemesh.mesh.sidecar import Sidecar
from hivemesh.mesh.wire import hop_suffix
from hivemesh.v1 import agent_pb2


def hop_bytes(sidecar: Sidecar, identity: str) -> int:
    """The bytes sidecar (serving the agent identity) appends to an agent's answer or final chunk: its hop."""
    hop = agent_pb2.Hop(kind="sidecar", identity=identity, instance=sidecar.instance_id, endpoint=sidecar.endpoint)
    return len(hop_suffix(hop))


def inbound_records(sidecar: Sidecar, caller: str) -> list[dict[str, Any]]:
    """sidecar's audit records of the inbound calls caller made, oldest first."""
    assert sidecar.audit is not None, "the sidecar's audit log is off"
    return [r for r in (json.loads(line) for line in sidecar.audit.spool.lines())
            if r.get("kind") == "inbound" and caller in r.get("caller", "")]
