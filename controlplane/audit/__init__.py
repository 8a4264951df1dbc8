"""hivemesh.controlplane.audit: the control plane's side of the audit log.

    store        AuditStore: every node's records in one hash-chained log; `audit_store(core)`
    checkpoints  signed checkpoints of its head; `verify_log` (offline, with a pinned key)
    query        AuditFilter: which entries a query wants
    service      the Audit gRPC service (shipping, query, export, verify) and AuditFeature (with the audit
                 of TLS handshakes refused on the control plane's own ports)
    interceptor  the audit of the control plane's own decisions, one record per RPC

The hash chain itself is the data plane's (`hivemesh.mesh.audit.chain`): one implementation for both sides.
"""

from hivemesh.controlplane.audit.checkpoints import (
    LogReport,
    load_public_key,
    public_key_pem,
    sign_checkpoint,
    verify_log,
)
from hivemesh.controlplane.audit.interceptor import ControlPlaneAuditInterceptor, interceptor
from hivemesh.controlplane.audit.query import KINDS, AuditFilter
from hivemesh.controlplane.audit.service import AuditFeature, AuditServicer, entry_json, install
from hivemesh.controlplane.audit.store import CONTROLPLANE_SOURCE, AuditStore, audit_store

__all__ = [
    "CONTROLPLANE_SOURCE",
    "KINDS",
    "AuditFeature",
    "AuditFilter",
    "AuditServicer",
    "AuditStore",
    "ControlPlaneAuditInterceptor",
    "LogReport",
    "audit_store",
    "entry_json",
    "install",
    "interceptor",
    "load_public_key",
    "public_key_pem",
    "sign_checkpoint",
    "verify_log",
]
