"""Peer identity: who is on the other end of the mutual-TLS connection (its SPIFFE id), or no call at all."""

from __future__ import annotations

from hivemesh.mesh.errors import PeerUnauthenticatedError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.pki import Peer, peer_from_auth_context

_MAX_CACHE = 4096


class PeerIdentityLayer:
    """Sets `call.peer` from the verified client certificate; refuses peers outside the trust domain.

    gRPC has already verified the chain against the trust bundle during the handshake; this layer turns the
    certificate into an identity. Parsed identities are cached per certificate, so the x509 parse runs once per
    peer certificate, not once per call.
    """

    name = "identity"

    def __init__(self, trust_domain: str) -> None:
        self._trust_domain = trust_domain
        self._cache: dict[bytes, Peer] = {}

    def check(self, call: Inbound) -> None:
        pem_values = call.auth_context.get("x509_pem_cert")
        if not pem_values:
            raise PeerUnauthenticatedError()
        pem: bytes = pem_values[0]
        peer = self._cache.get(pem)
        if peer is None:
            peer = peer_from_auth_context(call.auth_context, trust_domain=self._trust_domain)
            if len(self._cache) >= _MAX_CACHE:
                self._cache.clear()
            self._cache[pem] = peer
        call.peer = peer
