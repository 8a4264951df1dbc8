"""What the audit tests share: records, a spool of n of them, a control-plane store fed from a spool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hivemesh.controlplane.audit import AuditStore
from hivemesh.mesh.audit import Spool

NODE = "spiffe://hivemesh.local/agent/echo"


def fields(i: int) -> dict[str, Any]:
    """The i-th of a run of ordinary inbound records."""
    return {"v": 1, "time": f"2025-01-01T00:00:{i % 60:02d}.000000Z", "kind": "inbound", "method": "Invoke",
            "capability": "echo", "decision": "allow", "status": "OK", "caller": "spiffe://hivemesh.local/client/c",
            "latency_us": i, "node": NODE, "instance": "i-1", "trace_id": f"t{i}"}


def write_spool(directory: Path, n: int) -> Spool:
    """A real spool holding n records."""
    spool = Spool(directory, fsync_interval_s=0.2).open()
    for i in range(n):
        spool.append(fields(i))
    return spool

async def store_with(tmp_path: Path, n: int, *, every: int = 2500) -> tuple[AuditStore, Spool]:
    """A control-plane store holding a spool of n records, checkpointed every `every` entries."""
    store = AuditStore(tmp_path / "cp", identity="spiffe://hivemesh.local/controlplane", checkpoint_every=every).open()
    spool = write_spool(tmp_path / "node", n)
    lines = list(spool.lines())
    for i in range(0, n, 500):
        await store.append(spool.source, NODE, lines[i:i + 500])
    return store, spool
