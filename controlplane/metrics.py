"""The control plane's Prometheus metrics: the same catalog as every node, fed from its own state.

What only the control plane knows: the audit log's last signed checkpoint and verification failures, the
escalations open and the oldest one's age, and the TLS handshakes its ports refused. Escalations live in etcd,
so they are refreshed in the background every few seconds (a scrape never waits on etcd).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from google.protobuf.message import DecodeError

from hivemesh.mesh.audit.handshake import HandshakeAudit
from hivemesh.mesh.metrics import MeshMetrics, MetricsServer
from hivemesh.mesh.node_metrics import parse_listen
from hivemesh.v1 import escalation_pb2

log = logging.getLogger(__name__)

ESCALATIONS_PREFIX = b"/hivemesh/escalations/"
_REFRESH_S = 5.0


class ControlPlaneMetrics:
    """The control plane's `/metrics`; `watch_*` before `start`."""

    def __init__(self, listen: str) -> None:
        parsed = parse_listen(listen)
        if parsed is None:
            raise ValueError("ControlPlaneMetrics needs a listen address")
        self.metrics = MeshMetrics(packaging="controlplane", node="controlplane")
        self.server = MetricsServer(self.metrics, *parsed)
        self._handshakes: list[HandshakeAudit] = []
        self._escalations: tuple[int, float] = (0, 0.0)
        self._task: asyncio.Task[None] | None = None
        self._etcd: Any = None
        state = self.metrics.state
        state.add("hivemesh_tls_handshake_refusals", self._handshake_refusals)
        state.add("hivemesh_escalations_open", lambda: [({}, float(self._escalations[0]))])
        state.add("hivemesh_escalation_oldest_age_seconds", lambda: [({}, self._escalations[1])])

    @property
    def address(self) -> str:
        return self.server.address

    def watch_audit(self, store: Any) -> None:
        """The control plane's AuditStore: checkpoint age and verification failures."""
        self.metrics.state.add("hivemesh_audit_checkpoint_age_seconds",
                               lambda: [({}, time.time() - store.checkpoint_at)] if store.checkpoint_at else [])
        self.metrics.state.add("hivemesh_audit_verify_failures", lambda: [({}, float(store.verify_failures))])

    def watch_leader(self, leading: Callable[[], bool]) -> None:
        """Whether this replica leads, read at every scrape from its lease clock (no etcd call)."""
        self.metrics.state.add("hivemesh_controlplane_leader", lambda: [({}, 1.0 if leading() else 0.0)])

    def watch_handshakes(self, audits: list[HandshakeAudit]) -> None:
        self._handshakes.extend(audits)

    def watch_escalations(self, etcd: Any) -> None:
        self._etcd = etcd

    def _handshake_refusals(self) -> Iterator[tuple[Mapping[str, str], float]]:
        totals: dict[str, int] = {}
        for h in self._handshakes:
            for reason, n in list(h.refused_by_reason.items()):
                totals[reason] = totals.get(reason, 0) + n
        for reason, n in totals.items():
            yield {"reason": reason}, float(n)

    async def _refresh_escalations(self) -> None:
        while True:
            try:
                now_ms = time.time() * 1000
                open_n, oldest = 0, now_ms
                for kv in await self._etcd.get_prefix(ESCALATIONS_PREFIX):
                    try:
                        esc = escalation_pb2.Escalation.FromString(kv.value)
                    except DecodeError:
                        continue
                    if esc.status == escalation_pb2.ESCALATION_STATUS_PENDING:
                        open_n += 1
                        oldest = min(oldest, float(esc.created_at_unix_ms))
                self._escalations = (open_n, (now_ms - oldest) / 1000 if open_n else 0.0)
            except Exception as exc:  # noqa: BLE001 - keep the last reading; etcd may come back
                log.debug("could not read the escalations for metrics: %s", exc)
            await asyncio.sleep(_REFRESH_S)

    def start(self) -> None:
        self.server.start()
        if self._etcd is not None:
            self._task = asyncio.get_running_loop().create_task(self._refresh_escalations())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self.server.stop)
