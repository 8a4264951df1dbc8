"""The control plane's Trust service: delegated tokens, revocation, signing-key and CA rotation.

**Delegation** (RFC 8693 token exchange). When agent A, serving a call from U, calls B on U's behalf, A sends
`ExchangeToken(subject_token = the token U presented to A, audience = B)`. The new token keeps `sub = U` (the
principal, which policies can match), names the chain in `act` (outermost = the current actor A, nested =
earlier actors), is bound to A's certificate, never outlives the subject token, and its scopes only narrow:

- the subject token must be addressed to the caller (A may only exchange what was presented to A), be valid,
  not revoked (by jti, nor any identity in its chain), and the chain may hold at most MAX_DELEGATION_DEPTH actors;
- the *ceiling* is the subject token's `dlg` (what it may delegate onward); an original token has no `dlg`,
  and then the ceiling is whatever U's grants allow anywhere. Asking for a scope or a delegable capability
  outside the ceiling is refused (DELEGATION_DENIED), never silently granted;
- the scopes granted are requested ∩ ceiling ∩ U's grants on B ∩ A's grants on B ∩ what B offers;
- `dlg` of the new token (what B may delegate further) ⊆ the ceiling; by default its own scopes. Each `act`
  level records the ceiling of its hop, so verifiers re-check the narrowing too.

**Revocation** writes `/hivemesh/revoked/...` (see `hivemesh.mesh.revocation`); a revoked subject also gets no new
token, delegation or certificate renewal from here while its entry lasts (`RevocationGuard`), nor does anyone get
a token addressed to it. A token entry lasts as long as the token can; a subject's as long as any credential it
could still renew or obtain others with (`subject_ttl_s`): sized for tokens alone, it lapsed after 5.5 minutes and
the revoked identity renewed its still-valid one-hour certificate.

**Signing keys** follow `SigningKeys`' life cycle; this feature republishes the JWKS whenever it changes
(a key added, a key retired). **CA rotation** runs `CaRotation` steps on the CA every replica shares through etcd
(`hivemesh.controlplane.shared_ca`), publishes the signed trust bundle, and adopts steps other replicas ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import grpc

from hivemesh.controlplane import joins, shared_ca, shared_keys
from hivemesh.controlplane.ca import OPERATOR_TTL_S
from hivemesh.controlplane.ca_rotation import CaRotation
from hivemesh.controlplane.ca_stragglers import refuse_if_stranding
from hivemesh.controlplane.grants import GrantSet
from hivemesh.controlplane.issuer import DEFAULT_ACTIVATE_AFTER_S, MAX_TTL_S
from hivemesh.controlplane.replicas import is_leader, leader_fence
from hivemesh.controlplane.server import _agent_audience, _requested_scopes, _rpc
from hivemesh.mesh import json_depth
from hivemesh.mesh.advertise import advertised_host
from hivemesh.mesh.errors import (
    DelegationDeniedError,
    GrantDeniedError,
    HivemeshError,
    InvalidInputError,
    PermissionDeniedError,
    RegistryUnavailableError,
    TokenExpiredError,
    TokenRevokedError,
    abort,
)
from hivemesh.mesh.pki import Peer, SpiffeId, parse_spiffe_id
from hivemesh.mesh.revocation import Revocation, any_revoked, list_revocations, revoke, subject_revoked
from hivemesh.mesh.rpcwrap import UnaryBehaviour, wrap_handler
from hivemesh.mesh.tokens import MAX_DELEGATION_DEPTH, KeySet, TokenVerifier
from hivemesh.mesh.trustdoc import fingerprint
from hivemesh.v1 import control_pb2, trust_pb2, trust_pb2_grpc

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core

log = logging.getLogger(__name__)

EXTENSION: Final = "trust"
REVOCATION_MARGIN_S: Final = 30
"""Verifiers accept a token up to 30 s past its expiry (clock leeway), and a certificate is backdated as much: a
revocation outlives that too (and a renewal that passed the guard just before the entry was written)."""
MAX_ACTIVATE_AFTER_S: Final = 3600
"""The longest a rotated signing key may wait to sign (`RotateSigningKey`, `hivemesh keys rotate --activate-after`);
the shortest is 1 s, since a request's 0 means the default delay."""


async def subject_ttl_s(core: Core, subject: SpiffeId, now: float) -> int:
    """How long a revocation of subject must last: until no credential it could present to renew or obtain others
    is still good. That is the longest of its tokens (the issuer's max TTL), its certificates (all issued before the
    revocation, so none outlives now + the lifetime this CA gives its kind: `--cert-ttl` for workloads, 30 days
    for operators) and any join token minted for it and not yet used (the guard refuses those only while the
    entry lasts), plus the margin. Still bounded, so the list keeps only revocations that matter."""
    cert_s = OPERATOR_TTL_S if subject.kind == "operator" else core.config.cert_ttl_s
    longest = float(max(core.issuer.max_ttl_s, cert_s))
    for kv in await core.etcd.get_prefix(joins.JOIN_PREFIX):  # few: each lives under a lease of at most 7 days
        try:
            doc = json_depth.loads(kv.value)  # as `joins.create` stores it
            if (doc["name"], doc["kind"]) == (subject.name, subject.kind):
                longest = max(longest, min(float(doc["expires_at"]) - now, float(joins.MAX_TTL_S)))
        except (ValueError, KeyError, TypeError):
            continue  # unreadable: the join refuses it too
    return int(longest) + 1 + REVOCATION_MARGIN_S


def _require_operator(peer: Peer, what: str) -> None:
    if peer.spiffe_id.kind != "operator":
        raise PermissionDeniedError(f"only operators may {what}; {peer.spiffe_id} is not one")


class TrustServicer(trust_pb2_grpc.TrustServicer):
    def __init__(self, core: Core, feature: TrustFeature) -> None:
        self._core = core
        self._feature = feature

    # --- delegation ---
    @_rpc
    async def ExchangeToken(
        self, request: trust_pb2.ExchangeTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.IssueTokenResponse:
        core = self._core
        peer = core.peer(context)
        actor = str(peer.spiffe_id)
        audience = _agent_audience(request.audience, core.trust_domain)
        requested = _requested_scopes(request.scopes)
        delegable_req = _requested_scopes(request.delegable, "delegable")
        if request.ttl_seconds < 0:
            raise InvalidInputError("ttl_seconds must not be negative", field_violations={"ttl_seconds": "< 0"})
        if not request.subject_token:
            raise InvalidInputError("a subject_token is required", field_violations={"subject_token": "required"})
        # The subject token must be genuine and addressed to the caller itself.
        verifier = TokenVerifier(
            KeySet.from_jwks(core.issuer.keys.jwks_json()), issuer=core.issuer.issuer, audience=actor,
            max_lifetime_s=core.issuer.max_ttl_s,
        )
        claims = verifier.verify_signed(request.subject_token)
        chain = claims.delegation or (claims.subject,)
        revoked = await any_revoked(core.etcd, claims.jti, [*chain, actor])
        if revoked is not None:
            raise TokenRevokedError(f"the subject token is revoked ({revoked.jti or revoked.subject})")
        actors = len(chain)  # the actors the new token will name: everyone after the principal, plus the caller
        if actors > MAX_DELEGATION_DEPTH:
            raise DelegationDeniedError(
                f"the delegation chain would name {actors} actors; at most {MAX_DELEGATION_DEPTH} are allowed"
            )
        principal = claims.subject
        ceiling: frozenset[str] | None = claims.delegable
        if ceiling is None and claims.actor is not None:
            ceiling = claims.scopes
        grants = await GrantSet.from_etcd(core.etcd)
        if ceiling is not None:
            widened = sorted((set(requested) | set(delegable_req)) - ceiling)
            if widened:
                raise DelegationDeniedError(
                    f"the delegation would widen what the chain may do: {', '.join(widened)} (it may delegate: "
                    f"{', '.join(sorted(ceiling)) or 'nothing'})",
                    metadata={"widened": " ".join(widened)[:256]},
                )
        else:
            beyond = [c for c in delegable_req if not grants.may_ever(principal, c)]
            if beyond:
                raise DelegationDeniedError(
                    f"{principal} is granted {', '.join(beyond)} nowhere, so it cannot be delegated",
                    metadata={"widened": " ".join(beyond)[:256]},
                )
        instances = await core.agent_instances(audience.name)
        offered = sorted({c.name for i in instances for c in i.card.capabilities}) if instances else None
        wanted = requested or (sorted(ceiling) if ceiling is not None else [])
        for_principal = set(grants.allowed(principal, str(audience), wanted, offered))
        for_actor = set(grants.allowed(actor, str(audience), wanted, offered))
        scopes = sorted(for_principal & for_actor & (ceiling if ceiling is not None else for_principal))
        if not scopes:
            raise GrantDeniedError(
                f"no capability on {audience} is granted to both {principal} (the principal) and {actor} (the "
                f"actor) within what the chain may delegate",
                metadata={"subject": principal, "actor": actor, "audience": str(audience)},
            )
        dlg = sorted(delegable_req) if delegable_req else scopes
        hop_ceiling = sorted(ceiling) if ceiling is not None else sorted(set(scopes) | set(dlg))
        act: dict[str, Any] = {"sub": actor, "dlg": " ".join(hop_ceiling)}
        if isinstance(claims.raw.get("act"), dict):
            act["act"] = claims.raw["act"]
        remaining = int(claims.expires_at - time.time())
        if remaining <= 0:
            raise TokenExpiredError("the subject token has expired")
        ttl = min(request.ttl_seconds or core.issuer.default_ttl_s, core.issuer.max_ttl_s, remaining)
        issued = core.issuer.issue(
            principal, str(audience), scopes, ttl_s=ttl, cnf_thumbprint=peer.thumbprint,
            extra_claims={"act": act, "dlg": " ".join(dlg)},
        )
        log.info("delegated %s → %s for %s on %s: %s", " → ".join(chain), actor, principal, audience, scopes)
        return control_pb2.IssueTokenResponse(
            token=issued.token, expires_at_unix=int(issued.expires_at), scopes=issued.scopes, jti=issued.jti
        )

    # --- revocation ---
    @_rpc
    async def Revoke(
        self, request: trust_pb2.RevokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.RevokeResponse:
        core = self._core
        peer = core.peer(context)
        _require_operator(peer, "revoke tokens")
        if bool(request.jti) == bool(request.subject):
            raise InvalidInputError("give exactly one of jti or subject", field_violations={"jti/subject": "one"})
        subject: SpiffeId | None = None
        if request.subject:
            try:
                subject = parse_spiffe_id(request.subject)
            except ValueError as exc:
                raise InvalidInputError(str(exc), field_violations={"subject": str(exc)}) from None
            if subject.trust_domain != core.trust_domain:  # no token names it: the revocation would do nothing
                msg = f"must be an identity of trust domain {core.trust_domain}, not {subject.trust_domain}"
                raise InvalidInputError(f"subject {msg}", field_violations={"subject": msg})
        elif not (0 < len(request.jti) <= 128):
            raise InvalidInputError("jti must be 1..128 characters", field_violations={"jti": "length"})
        now = time.time()
        ttl = core.issuer.max_ttl_s + REVOCATION_MARGIN_S  # a token's entry: as long as the token can live
        if subject is not None:
            ttl = await subject_ttl_s(core, subject, now)
        rev = Revocation(jti=request.jti, subject=request.subject, revoked_at=now, expires_at=now + ttl,
                         by=str(peer.spiffe_id), note=request.note[:256])
        await revoke(core.etcd, rev, ttl)
        log.warning("%s revoked %s", peer.spiffe_id, f"token {rev.jti}" if rev.jti else f"subject {rev.subject}")
        return trust_pb2.RevokeResponse(key=rev.key(), expires_at_unix=int(rev.expires_at))

    @_rpc
    async def ListRevocations(
        self, request: trust_pb2.ListRevocationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.ListRevocationsResponse:
        _require_operator(self._core.peer(context), "list revocations")
        revs = await list_revocations(self._core.etcd)
        return trust_pb2.ListRevocationsResponse(revocations=[
            trust_pb2.Revocation(jti=r.jti, subject=r.subject, revoked_at_unix=int(r.revoked_at),
                                 expires_at_unix=int(r.expires_at), by=r.by, note=r.note)
            for r in revs
        ])

    # --- signing keys ---
    def _keys(self) -> trust_pb2.SigningKeysResponse:
        keys = self._core.issuer.keys
        return trust_pb2.SigningKeysResponse(keys=[
            trust_pb2.SigningKeyInfo(
                kid=k.kid, state=keys.state_of(k), created_at_unix=int(k.created_at),
                activates_at_unix=int(k.activates_at), retires_at_unix=int(keys.retires_at(k) or 0),
            )
            for k in keys.published()
        ])

    @_rpc
    async def RotateSigningKey(
        self, request: trust_pb2.RotateSigningKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.SigningKeysResponse:
        _require_operator(self._core.peer(context), "rotate signing keys")
        # proto3 gives the field no presence: 0 is "unset", the default delay, never "activate now".
        delay = request.activate_after_seconds or DEFAULT_ACTIVATE_AFTER_S
        if not 1 <= delay <= MAX_ACTIVATE_AFTER_S:
            msg = (f"activate_after_seconds must be 1..{MAX_ACTIVATE_AFTER_S} (0 or unset: the default, "
                   f"{DEFAULT_ACTIVATE_AFTER_S:g} s), got {request.activate_after_seconds}")
            raise InvalidInputError(msg, field_violations={"activate_after_seconds": msg})
        key = self._core.issuer.keys.rotate(float(delay))
        await shared_keys.update(self._core.etcd, add=key)  # every replica signs with it once it activates
        await self._feature.publish_jwks()
        log.warning("new token signing key %s published; it signs from %s", key.kid, time.ctime(key.activates_at))
        return self._keys()

    @_rpc
    async def ListSigningKeys(
        self, request: trust_pb2.ListSigningKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.SigningKeysResponse:
        self._core.peer(context)
        return self._keys()

    # --- CA rotation ---
    def _ca_status(self) -> trust_pb2.CaStatusResponse:
        st = self._feature.rotation.status(self._core.ca)
        return trust_pb2.CaStatusResponse(
            phase=st["phase"], roots=st["roots"], signing_root=st["signing_root"], generation=st["generation"],
            bundle_pem=self._core.ca.bundle_pem(),
        )

    @_rpc
    async def RotateCa(
        self, request: trust_pb2.RotateCaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.CaStatusResponse:
        _require_operator(self._core.peer(context), "rotate the CA")
        await self._feature.rotate_ca(request.step)
        return self._ca_status()

    @_rpc
    async def GetCaStatus(
        self, request: trust_pb2.GetCaStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trust_pb2.CaStatusResponse:
        self._core.peer(context)
        return self._ca_status()


class TrustFeature:
    """Publishes the JWKS as keys come and go, and the trust bundle; runs CA rotation steps."""

    def __init__(self, core: Core, *, tick_s: float = 1.0) -> None:
        self.core = core
        self.rotation = CaRotation(core.config.certs_dir,
                                   hosts=[advertised_host(core.config.host, core.config.advertise)])
        self._ca_revision = 0
        """The mod revision of the shared CA document this replica's folder and core reflect."""
        self._tick_s = tick_s
        self._published = ""
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            await self._follow_ca()
        await self.rotation.publish(self.core.etcd, self.core.ca)
        self._published = self.core.issuer.keys.jwks_json()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def publish_jwks(self) -> None:
        async with self._lock:
            await self._publish_jwks()

    async def _publish_jwks(self) -> None:
        """Publish the key set signed by every root key held (caller holds the lock)."""
        keys = self.core.issuer.keys
        text = keys.jwks_json()
        await keys.publish(self.core.etcd, self.rotation.signers(self.core.ca))
        self._published = text

    async def _follow_ca(self) -> None:
        """Adopt the shared CA when another replica ran a rotation step (caller holds the lock)."""
        fresh = await shared_ca.refresh(self.core.etcd, self.core.config.certs_dir, self._ca_revision)
        if fresh is not None:
            self._ca_revision = fresh
            await self._adopt_ca()

    async def _adopt_ca(self) -> None:
        """Issue from and trust what the certs folder now holds, with this replica's own certificates re-issued
        from the signing root (for new handshakes: the credentials read core at each one)."""
        cfg = self.core.config
        hosts = [advertised_host(cfg.host, cfg.advertise)]
        ca, server_cert = await asyncio.to_thread(shared_ca.follow_local, cfg.certs_dir, hosts)
        self.rotation = CaRotation(cfg.certs_dir)
        self.core.ca = ca
        self.core.server_cert = server_cert

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            try:
                async with self._lock:
                    before = self._ca_revision
                    await self._follow_ca()
                if self._ca_revision != before:
                    log.info("CA rotation now %s (generation %d), as another replica left it",
                             self.rotation.state.phase, self.rotation.state.generation)
            except Exception as exc:  # noqa: BLE001 - keep the CA held; etcd may come back
                log.warning("could not follow the shared CA: %s", exc)
            try:
                keys = self.core.issuer.keys
                if keys.jwks_json() != self._published and is_leader(self.core):  # one publisher of many
                    await self.publish_jwks()  # a key retired: it leaves the JWKS
                    gone = keys.prune()
                    if gone:  # and every replica's set (fenced: a replaced leader retires nothing)
                        await shared_keys.update(self.core.etcd, drop=tuple(gone), fence=leader_fence(self.core))
            except Exception as exc:  # noqa: BLE001 - keep ticking through etcd trouble
                log.warning("could not republish the JWKS: %s", exc)

    async def rotate_ca(self, step: str) -> None:
        async with self._lock:
            await self._follow_ca()  # the step starts from the shared state, whichever replica ran the last one
            if step == "finish" and self.rotation.state.phase == "activated":  # registered nodes of every replica
                refuse_if_stranding(await self.core.agent_instances(), fingerprint(self.core.ca.certificate))
            self._ca_revision = await shared_ca.step(
                self.core.etcd, self.core.config.certs_dir, step, revision=self._ca_revision)
            await self._adopt_ca()
            await self.rotation.publish(self.core.etcd, self.core.ca)
            # Re-sign the key set with this step's roots: once the old root is dropped, nodes (and any that
            # start later) accept only a key set the new root signed.
            await self._publish_jwks()


class RevocationGuard(grpc.aio.ServerInterceptor):
    """Refuses new tokens, delegations and certificates to a revoked subject while its entry lasts, joins included:
    a join token minted for it before the revocation (perhaps the leaked one) got a fresh certificate, and with it
    the identity's etcd access. Refuses anyone a token or delegation addressed to a revoked subject too
    (PERMISSION_DENIED): callers were still issued tokens for it, so calls kept flowing to the revoked agent."""

    JOIN: Final = "/hivemesh.v1.Join/SignCertificate"
    ADDRESSED: Final = frozenset({"/hivemesh.v1.ControlPlane/IssueToken", "/hivemesh.v1.Trust/ExchangeToken"})
    """The methods whose request names an audience, the agent the token would be addressed to."""
    GUARDED: Final = frozenset({"/hivemesh.v1.ControlPlane/RenewCertificate", JOIN, *ADDRESSED})

    def __init__(self, core: Core) -> None:
        self._core = core

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.GUARDED or handler.unary_unary is None:
            return handler
        core = self._core
        joining = handler_call_details.method == self.JOIN
        addressed = handler_call_details.method in self.ADDRESSED

        async def subject(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
            """Whom the call would serve (None: nobody yet, the servicer refuses the caller or its token)."""
            if not joining:
                try:
                    return str(core.peer(context).spiffe_id)
                except HivemeshError:
                    return None  # the servicer says who the caller is not
            # No client certificate on the join port: the identity is the one the join token was minted for.
            token = request.join_token
            minted = await core.hedged.run(lambda etcd: joins.minted_for(etcd, token))
            return None if minted is None else f"spiffe://{core.trust_domain}/{minted[1]}/{minted[0]}"

        def audience(request: Any) -> str:
            """The agent a token would be addressed to ("": none, or one the servicer refuses naming the field)."""
            if not addressed:
                return ""
            try:
                return str(_agent_audience(request.audience, core.trust_domain))
            except InvalidInputError:
                return ""

        def guard(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                sid, aud = "", audience(request)
                try:
                    sid = await subject(request, context) or ""
                    # Hedged like the issuing path's other reads: a replica whose round robin hands this read
                    # to a cut-off etcd member still answers within a client's share (docs/multihost.md).
                    rev = await core.hedged.run(lambda etcd: subject_revoked(etcd, sid)) if sid else None
                    to_revoked = await core.hedged.run(lambda etcd: subject_revoked(etcd, aud)) if aud else None
                except Exception as exc:  # noqa: BLE001 - fail closed, whatever the read raised
                    # Not knowing is not "not revoked": a token issued now has an iat past the revocation, so
                    # no node would refuse it either. The caller retries (elsewhere) as for any etcd trouble.
                    await abort(context, RegistryUnavailableError(
                        f"cannot read the revocations to check {sid or 'the join token'} now ({type(exc).__name__}); "
                        "try again"))
                if rev is not None:
                    await abort(context, TokenRevokedError(
                        f"{rev.subject} is revoked until {time.ctime(rev.expires_at)} (by {rev.by})"
                    ))
                if to_revoked is not None:  # the caller is fine; whom it would call is not
                    await abort(context, PermissionDeniedError(
                        f"{to_revoked.subject} is revoked until {time.ctime(to_revoked.expires_at)} (by "
                        f"{to_revoked.by}): no token addressed to it is issued", metadata={
                            "audience": to_revoked.subject, "revoked_until": str(int(to_revoked.expires_at))}))
                return await inner(request, context)

            return guarded

        return wrap_handler(handler, unary_unary=guard)


def interceptor(core: Core) -> grpc.aio.ServerInterceptor:
    return RevocationGuard(core)


def install(core: Core, server: grpc.aio.Server) -> TrustFeature:
    """Add the Trust service to the control plane's mutual-TLS server."""
    feature = TrustFeature(core)
    core.extensions[EXTENSION] = feature
    trust_pb2_grpc.add_TrustServicer_to_server(TrustServicer(core, feature), server)
    return feature


__all__ = ["MAX_TTL_S", "RevocationGuard", "TrustFeature", "TrustServicer", "install", "interceptor"]
