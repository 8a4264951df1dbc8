"""What certificate a serving node presents, said in its registry entry, so a CA rotation cannot strand it.

`hivemesh ca rotate --step finish` drops the old root; a node still presenting a certificate the old root
issued would then fail every handshake. So each registered instance carries two labels: the fingerprint of the
root that issued its current certificate, and that certificate's not-after (unix seconds). They are written at
registration and again after every renewal, and the control plane refuses `finish` while any registered
instance names another root than the one signing now (`hivemesh.controlplane.ca_stragglers`).

A node whose certificate expired while renewal keeps failing (revoked, cut off from the control plane) can no
longer complete a handshake with anyone: it reports NOT_SERVING on its health service (the "certificate" cause
of its `Readiness`) and leaves the registry, instead of staying listed as live and failing every call sent to
it. Callers that only call (clients, not in the registry) carry no labels: a rotation does not wait for them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from hivemesh.mesh.pki import load_certs
from hivemesh.mesh.trustdoc import fingerprint, issued_by
from hivemesh.v1 import mesh_pb2

if TYPE_CHECKING:
    from hivemesh.mesh.node import MeshNode
    from hivemesh.mesh.readiness import Readiness
    from hivemesh.mesh.registry import Registration
    from hivemesh.mesh.tls import Workload

log = logging.getLogger(__name__)

CERT_ROOT_LABEL: Final = "hivemesh.io/cert-root"
"""SHA-256 fingerprint (hex) of the root CA certificate that issued the instance's current certificate."""
CERT_NOT_AFTER_LABEL: Final = "hivemesh.io/cert-not-after"
"""The current certificate's expiry, unix seconds."""


def issuing_root(workload: Workload) -> str:
    """Fingerprint of the root in the workload's trust bundle that issued its certificate ("" if none did)."""
    for root in load_certs(workload.bundle_pem):
        if issued_by(workload.cert_pem, root):
            return fingerprint(root)
    return ""


def cert_labels(workload: Workload) -> dict[str, str]:
    """The labels a registry entry carries about the certificate its endpoint presents."""
    return {CERT_ROOT_LABEL: issuing_root(workload), CERT_NOT_AFTER_LABEL: str(int(workload.expires_at))}


def follow_certificate(node: MeshNode, registration: Registration, readiness: Readiness) -> None:
    """Keep registration's certificate labels current as node renews; when its certificate expired and cannot
    be renewed, say NOT_SERVING through readiness and leave the registry."""

    async def on_event(event: str, workload: Workload) -> None:
        if event == "renewed":
            instance = mesh_pb2.AgentInstance()
            instance.CopyFrom(registration.instance)
            instance.labels.update(cert_labels(workload))
            await readiness.report("certificate", None)
            await registration.update(instance)
        elif event == "expired":
            log.error("%s: the certificate expired and cannot be renewed; not serving, leaving the registry",
                      workload.spiffe_id)
            await readiness.report("certificate", f"the certificate of {workload.spiffe_id} expired and cannot be "
                                                  "renewed")
            await registration.stop()

    node.certificate_hooks.append(on_event)
