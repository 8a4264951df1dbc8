"""A node's audit log: one chained record per inbound decision, written to its spool and shipped.

Each node (SDK agent or sidecar) writes one record per call the inbound chain decided on (allowed, denied and
by which rule, rate-limited, circuit-open, refused input, errors) to its local spool *before the response is
released* (`hivemesh.mesh.audit.spool`); a background shipper sends it to the control plane
(`hivemesh.mesh.audit.shipper`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import grpc

from hivemesh.mesh.audit.record import FORMAT, classify, decision_fields, short, utc_iso
from hivemesh.mesh.audit.shipper import AuditSink, Shipper
from hivemesh.mesh.audit.spool import Spool, open_spool
from hivemesh.mesh.errors import AuditUnavailableError, HivemeshError
from hivemesh.mesh.layers.base import Inbound

log = logging.getLogger(__name__)


class AuditLog:
    """A DecisionObserver that writes one chained record per inbound decision, and ships the spool.

    Call `start(sink)` once an event loop runs to ship; without it the records only accumulate in the spool.
    Writing never waits on the network. If the spool cannot be written the observer raises
    AuditUnavailableError, and the interceptor fails the call closed rather than serve it unaudited.
    """

    def __init__(self, spool: Spool, *, node: str, instance: str, clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.node = node
        self.instance = instance
        self._clock = clock
        self.shipper: Shipper | None = None

    @classmethod
    def open(
        cls, base: Path | str, *, node: str, instance: str, name: str | None = None, **spool_kwargs: Any
    ) -> AuditLog:
        """An AuditLog over the spool `<base>/<name>` (name defaults from the node's SPIFFE id)."""
        if name is None:
            kind_name = node.rsplit("/", 2)[-2:]
            name = "-".join(kind_name) if len(kind_name) == 2 else "node"
        return cls(open_spool(base, name, identity=node, **spool_kwargs), node=node, instance=instance)

    def __call__(self, call: Inbound, err: HivemeshError | None, code: grpc.StatusCode, elapsed: float) -> None:
        now = self._clock()
        try:
            rec = decision_fields(call, err, code, elapsed, now=now)
            rec["node"] = self.node
            rec["instance"] = self.instance
            self.spool.append(rec)
        except AuditUnavailableError:
            raise
        except Exception as exc:  # a decision is never left unrecorded: keep what is certain
            log.exception("the audit record of a %s decision could not be built; writing its outline", code.name)
            self.spool.append(self._outline(call, err, code, elapsed, now, exc))

    def _outline(self, call: Inbound, err: HivemeshError | None, code: grpc.StatusCode, elapsed: float,
                 now: float, exc: BaseException) -> dict[str, Any]:
        """What a decision's record holds when its full fields could not be built or encoded (something in the
        call's foreign parts or notes broke them): the decision, its status and reason, and who asked as TLS
        proved it, from values of the mesh's own making only."""
        return {
            "v": FORMAT, "time": utc_iso(now), "kind": "inbound", "method": str(call.method)[:64],
            "decision": classify(err, code), "status": code.name,
            "reason": err.reason if err is not None else ("" if code == grpc.StatusCode.OK else code.name),
            "latency_us": max(int(elapsed * 1e6), 0),
            "caller": str(call.peer.spiffe_id) if call.peer is not None else "",
            "incomplete": short(f"{type(exc).__name__}: {exc}"),
            "node": self.node, "instance": self.instance,
        }

    def record(self, fields: Mapping[str, Any]) -> int:
        """Append any other decision (e.g. an outbound refusal such as CIRCUIT_OPEN); adds time/node/instance."""
        rec = {"v": FORMAT, "time": utc_iso(self._clock()), **fields, "node": self.node, "instance": self.instance}
        return self.spool.append(rec)

    def outbound(self, capability: str, err: HivemeshError) -> None:
        """An OutboundPipeline observer: a call this node refused itself before sending it (circuit open, no
        live instance, no grant, its own certificate expired). Written like an inbound record, kind outbound."""
        try:
            self.record({
                "kind": "outbound", "capability": short(capability, 128), "decision": classify(err, err.code),
                "status": err.code.name, "reason": err.reason, "message": short(err.message),
                "caller": self.node, "latency_us": 0,
            })
        except AuditUnavailableError as exc:
            log.error("cannot record an outbound refusal: %s", exc.message)

    def signed(self, fields: Mapping[str, Any]) -> None:
        """An OutboundPipeline signed_recorder: a signed answer this node verified as the caller, with the
        request digest it signed, the answer digest and the agent's signature (the caller's half of the proof)."""
        try:
            self.record({**fields, "caller": self.node, "latency_us": 0})
        except AuditUnavailableError as exc:
            log.error("cannot record a verified signed answer: %s", exc.message)

    def start(self, sink: Callable[[], AuditSink], **kwargs: Any) -> Shipper:
        self.shipper = Shipper(self.spool, sink, **kwargs)
        self.shipper.start()
        return self.shipper

    async def close(self, *, drain_s: float = 2.0) -> None:
        if self.shipper is not None:
            await self.shipper.stop(drain_s=drain_s)
        self.spool.close()


class _NodeLike(Protocol):
    @property
    def controlplane(self) -> Any: ...


def open_node_audit(
    node: _NodeLike, *, spiffe_id: str, instance: str, directory: Path | str | None = None, **spool_kwargs: Any
) -> AuditLog:
    """The audit log of a serving node: spool under `directory` (default `<HIVEMESH_HOME>/audit`), shipped to
    the control plane through the node's own control-plane client (it follows certificate renewals)."""
    from hivemesh.mesh.settings import state_dir

    base = Path(directory) if directory is not None else state_dir() / "audit"
    audit = AuditLog.open(base, node=spiffe_id, instance=instance, **spool_kwargs)
    audit.start(lambda: node.controlplane)
    return audit
