"""Who is calling the A2A gateway: the client certificate of the TLS connection and the bearer token with it.

uvicorn does not hand the peer certificate to the application (there is no ASGI TLS extension in it), so
`PeerCertH11Protocol` reads it from each connection's SSL object and puts it in the request scope under
`PEER_CERT_SCOPE_KEY`. `authenticate` then checks the token as an inbound mesh call would: signature, audience
(the gateway), expiry, revocation and the binding to that very certificate (RFC 8705).

A task belongs to its owner scope (`A2ACaller.user_name`: a2a-sdk's `resolve_user_scope`, the task store's owner,
the run's `a2a.owner` label), compared for equality and nothing else: the principal, and for a request on one
agent's route (`/agents/<agent>/`) that route as well. So each route is a task space of its own: a task sent on
alpha's route is "task not found" (A2A -32001) on beta's route and on the gateway's general route, for every
task-addressed operation (a follow-up message, get, cancel, resubscribe, list), exactly as another principal's
task is, and its existence is not revealed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, replace
from typing import Any

from a2a.auth.user import User
from a2a.server.context import ServerCallContext
from a2a.server.routes.common import DefaultServerCallContextBuilder
from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from hivemesh.mesh.errors import HivemeshError, UnauthenticatedError
from hivemesh.mesh.pki import cert_thumbprint_s256, spiffe_id_of
from hivemesh.mesh.tokens import TokenClaims, TokenVerifier

PEER_CERT_SCOPE_KEY = "hivemesh.peer_cert_der"
CALLER_STATE_KEY = "hivemesh.caller"
AGENT_STATE_KEY = "hivemesh.agent"
"""Call-context state: the agent whose card the caller addressed (None: the gateway's card, every agent)."""

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class PeerCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus the client certificate (DER, verified by the TLS handshake) in each scope,
    and TCP_NODELAY on each connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # A connection accepted on a socket handed to uvicorn comes without TCP_NODELAY: the response's header
        # and body writes then meet the peer's delayed ACK, ~44 ms per request (measured; 0.6 ms with it).
        raw: socket.socket | None = transport.get_extra_info("socket")
        if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        sslobj: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if der:
            inner: ASGIApp = self.app

            async def with_cert(scope: Scope, receive: Any, send: Any) -> None:
                scope[PEER_CERT_SCOPE_KEY] = der
                await inner(scope, receive, send)

            self.app = with_cert


@dataclass(frozen=True)
class A2ACaller(User):
    """An authenticated A2A caller: its certificate's identity and the token the gateway delegates with."""

    spiffe_id: str
    principal: str
    """The token's subject: who the calls are made for (the caller itself, or whom it acts for)."""
    token: str
    scopes: frozenset[str]
    route: str | None = None
    """The agent whose route (`/agents/<agent>/`) the request came by; None: the gateway's general route."""

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        """The owner scope of the tasks this request may see and drive: the principal on the general route (as
        before per-agent routes existed, so its tasks keep their owner), `<principal> /agents/<agent>/` on an
        agent's route. A principal is a SPIFFE id, which has no space: no route's scope is another's."""
        return self.principal if self.route is None else f"{self.principal} /agents/{self.route}/"


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    kind, _, value = header.partition(" ")
    return value.strip() or None if kind.lower() == "bearer" else None


def authenticate(verifier: TokenVerifier, cert_der: bytes | None, authorization: str | None) -> A2ACaller:
    """The caller of one HTTP request, or UnauthenticatedError saying what is missing."""
    if cert_der is None:
        raise UnauthenticatedError("present a client certificate issued by the mesh CA (mutual TLS)")
    token = bearer(authorization)
    if token is None:
        raise UnauthenticatedError(
            f"send 'Authorization: Bearer <token>': a capability token for audience {verifier.audience} from "
            "the control plane's IssueToken, bound to this client certificate"
        )
    claims: TokenClaims = verifier.authenticate(token, peer_thumbprint=cert_thumbprint_s256(cert_der))
    return A2ACaller(spiffe_id=spiffe_id_of(cert_der), principal=claims.subject, token=token, scopes=claims.scopes)


class MeshCallContextBuilder(DefaultServerCallContextBuilder):
    """Puts the authenticated caller (set by the gateway's route before dispatch), scoped to the route it came by
    (`A2ACaller.user_name`), and the agent the caller addressed into a2a-sdk's call context: every task lookup
    (a2a-sdk's handler, the task store, the executor) then finds only this route's tasks."""

    def build(self, request: Request) -> ServerCallContext:
        ctx = super().build(request)
        agent = request.path_params.get("agent")
        caller = request.scope.get(CALLER_STATE_KEY)
        if isinstance(caller, A2ACaller):
            caller = replace(caller, route=agent)
        if caller is not None:
            ctx.user = caller
        ctx.state[CALLER_STATE_KEY] = caller
        ctx.state[AGENT_STATE_KEY] = agent
        return ctx


def refusal(exc: HivemeshError) -> dict[str, Any]:
    """The `data` of a JSON-RPC error for a mesh refusal: the mesh's typed reason, for programs."""
    data: dict[str, Any] = {"reason": exc.reason, "grpc_code": exc.code.name}
    if exc.metadata:
        data["metadata"] = dict(exc.metadata)
    return data
