"""hivemesh.mesh.audit: the audit log of every decision a node makes, hash-chained, spooled and shipped.

    chain     the hash chain (canonical JSON, seal, verify): the one implementation, the control plane's too
    record    what goes into a record (decision classes, the fields of one inbound decision, times)
    spool     the local append-only spool, written before a response is released
    shipper   sending the spool to the control plane in order, resuming by sequence number
    recorder  AuditLog: a node's decision observer over its spool and shipper
    handshake the audit of TLS handshakes refused below gRPC (its own subpackage)

Public names load lazily (PEP 562), so a main can import `hivemesh.mesh.audit.handshake.switch` before gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hivemesh.mesh.lazy import lazy_exports

if TYPE_CHECKING:
    from hivemesh.mesh.audit.chain import (
        GENESIS,
        ChainProblem,
        ChainState,
        canonical,
        check_link,
        parse_line,
        record_hash,
        seal,
        verify_chain,
    )
    from hivemesh.mesh.audit.record import (
        ALLOW,
        CIRCUIT_OPEN,
        DECISIONS,
        DENY,
        ERROR,
        FORMAT,
        INVALID,
        RATE_LIMITED,
        classify,
        decision_fields,
        parse_time,
        utc_iso,
    )
    from hivemesh.mesh.audit.recorder import AuditLog, open_node_audit
    from hivemesh.mesh.audit.shipper import AuditSink, Shipper
    from hivemesh.mesh.audit.spool import Spool, open_spool

_LAZY = {
    "GENESIS": "hivemesh.mesh.audit.chain",
    "ChainProblem": "hivemesh.mesh.audit.chain",
    "ChainState": "hivemesh.mesh.audit.chain",
    "canonical": "hivemesh.mesh.audit.chain",
    "check_link": "hivemesh.mesh.audit.chain",
    "parse_line": "hivemesh.mesh.audit.chain",
    "record_hash": "hivemesh.mesh.audit.chain",
    "seal": "hivemesh.mesh.audit.chain",
    "verify_chain": "hivemesh.mesh.audit.chain",
    "FORMAT": "hivemesh.mesh.audit.record",
    "ALLOW": "hivemesh.mesh.audit.record",
    "DENY": "hivemesh.mesh.audit.record",
    "INVALID": "hivemesh.mesh.audit.record",
    "RATE_LIMITED": "hivemesh.mesh.audit.record",
    "CIRCUIT_OPEN": "hivemesh.mesh.audit.record",
    "ERROR": "hivemesh.mesh.audit.record",
    "DECISIONS": "hivemesh.mesh.audit.record",
    "classify": "hivemesh.mesh.audit.record",
    "decision_fields": "hivemesh.mesh.audit.record",
    "parse_time": "hivemesh.mesh.audit.record",
    "utc_iso": "hivemesh.mesh.audit.record",
    "Spool": "hivemesh.mesh.audit.spool",
    "open_spool": "hivemesh.mesh.audit.spool",
    "AuditSink": "hivemesh.mesh.audit.shipper",
    "Shipper": "hivemesh.mesh.audit.shipper",
    "AuditLog": "hivemesh.mesh.audit.recorder",
    "open_node_audit": "hivemesh.mesh.audit.recorder",
}

__all__ = [
    "ALLOW",
    "CIRCUIT_OPEN",
    "DECISIONS",
    "DENY",
    "ERROR",
    "FORMAT",
    "GENESIS",
    "INVALID",
    "RATE_LIMITED",
    "AuditLog",
    "AuditSink",
    "ChainProblem",
    "ChainState",
    "Shipper",
    "Spool",
    "canonical",
    "check_link",
    "classify",
    "decision_fields",
    "open_node_audit",
    "open_spool",
    "parse_line",
    "parse_time",
    "record_hash",
    "seal",
    "utc_iso",
    "verify_chain",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
