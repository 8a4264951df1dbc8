"""hivemesh.mesh.audit.handshake: audit records for the TLS handshakes a front door refuses below gRPC.

    events    HandshakeFailure and the HandshakeEvents interface (failures in)
    audit     HandshakeAudit: one port's failures to audit records (records out), coalesced, probed live
    reasons   why a handshake failed, from the TLS library's words
    switch    whether this process audits them (consent, HIVEMESH_AUDIT_HANDSHAKES) and gRPC's tracer variable
    tracer    TracerEvents: failures from gRPC's handshaker tracer, today's one HandshakeEvents source;
              start_owned: the tracer and the tee, first thing in an owned process's main
    tracelog  parsing the tracer's text;  tee  the stderr tee that reads it off fd 2

Public names load lazily (PEP 562): `switch` imports nothing of gRPC and must stay importable before it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hivemesh.mesh.lazy import lazy_exports

if TYPE_CHECKING:
    from hivemesh.mesh.audit.handshake.audit import HandshakeAudit
    from hivemesh.mesh.audit.handshake.events import HandshakeEvents, HandshakeFailure, Listener
    from hivemesh.mesh.audit.handshake.switch import ENV, child_environment, enable, opted_in, opted_out
    from hivemesh.mesh.audit.handshake.tracer import TracerEvents, start_owned, tracer_events

_LAZY = {
    "HandshakeEvents": "hivemesh.mesh.audit.handshake.events",
    "HandshakeFailure": "hivemesh.mesh.audit.handshake.events",
    "Listener": "hivemesh.mesh.audit.handshake.events",
    "HandshakeAudit": "hivemesh.mesh.audit.handshake.audit",
    "ENV": "hivemesh.mesh.audit.handshake.switch",
    "child_environment": "hivemesh.mesh.audit.handshake.switch",
    "enable": "hivemesh.mesh.audit.handshake.switch",
    "opted_in": "hivemesh.mesh.audit.handshake.switch",
    "opted_out": "hivemesh.mesh.audit.handshake.switch",
    "TracerEvents": "hivemesh.mesh.audit.handshake.tracer",
    "tracer_events": "hivemesh.mesh.audit.handshake.tracer",
    "start_owned": "hivemesh.mesh.audit.handshake.tracer",
}

__all__ = [
    "ENV",
    "HandshakeAudit",
    "HandshakeEvents",
    "HandshakeFailure",
    "Listener",
    "TracerEvents",
    "child_environment",
    "enable",
    "opted_in",
    "opted_out",
    "start_owned",
    "tracer_events",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
