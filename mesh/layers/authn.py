"""Token check: the call carries a capability token, signed by the control plane, for this agent,
covering the capability called, bound to the caller's certificate and presented by the identity it names
(the subject, or for a delegated token the current actor)."""

from __future__ import annotations

from typing import Final

from hivemesh.mesh.errors import IdentityMismatchError, PeerUnauthenticatedError
from hivemesh.mesh.layers.base import Inbound
from hivemesh.mesh.tokens import TokenVerifier

ACTION_OF_METHOD: Final = {"Invoke": "invoke", "InvokeStream": "stream", "Describe": "describe"}
"""The action a call performs, for scopes like `cap:invoke` and for authorization rules."""


class TokenLayer:
    """Verifies the bearer JWT (cached per token by the verifier) and records its claims on the call.

    The claims are recorded as soon as the token is authentic, before the identity and scope checks, so a
    refusal's audit record still says whom the token spoke for. Describe carries no capability, so it needs
    only a verified peer, not a token.
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
        claims = self._verifier.authenticate(call.bearer(), peer_thumbprint=peer.thumbprint)
        call.claims = claims
        presenter = claims.presenter
        if presenter != str(peer.spiffe_id):
            role = "actor" if claims.actor else "subject"
            raise IdentityMismatchError(
                f"token {role} {presenter} is not the caller's certificate identity {peer.spiffe_id}"
            )
        self._verifier.check_scope(claims, call.request.capability, ACTION_OF_METHOD.get(call.method))
