"""Token check: the call carries a capability token, signed by the control plane, for this agent,
covering the capability called, bound to the caller's certificate and issued to the caller itself."""

from __future__ import annotations

from hivemesh.mesh.errors import IdentityMismatchError, PeerUnauthenticatedError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.tokens import TokenVerifier, bearer_from_metadata


class TokenLayer:
    """Verifies the bearer JWT (cached per token by the verifier) and records its claims on the call.

    Describe carries no capability, so it needs only a verified peer, not a token.
    """

    name = "token"

    def __init__(self, verifier: TokenVerifier) -> None:
        self._verifier = verifier

    def check(self, call: Inbound) -> None:
        if call.request is None:
            return
        peer = call.peer
        if peer is None:  # ordering guard: identity must run first
            raise PeerUnauthenticatedError()
        token = bearer_from_metadata(call.metadata)
        claims = self._verifier.verify(
            token, capability=call.request.capability, peer_thumbprint=peer.thumbprint
        )
        if claims.subject != str(peer.spiffe_id):
            raise IdentityMismatchError(
                f"token subject {claims.subject} is not the caller's certificate identity {peer.spiffe_id}"
            )
        call.claims = claims
