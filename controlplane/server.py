"""The control-plane process: CA, token issuer and join service over gRPC.

Two listeners, because their callers differ: the join port is server-authenticated TLS only (a joining
workload has no certificate yet; its one-time token authenticates it) and serves `Join` alone; the main
port is mutual TLS and serves `ControlPlane`, where every caller is identified by its certificate. Keeping
them on separate servers means `ControlPlane` is never reachable without a client certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import aetcd
import grpc
from cryptography import x509
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2_grpc

from hivemesh.controlplane import joins, shared_ca, shared_keys
from hivemesh.controlplane.ca import CaFiles, CertificateAuthority, ensure_controlplane_cert, load_ca
from hivemesh.controlplane.ca_rotation import CaRotation
from hivemesh.controlplane.etcd_certs import controlplane_etcd_tls
from hivemesh.controlplane.etcd_hedge import HedgedEtcd
from hivemesh.controlplane.grants import GrantSet, load_grants, seed_grants
from hivemesh.controlplane.issuer import MAX_TTL_S, SigningKeys, TokenIssuer
from hivemesh.controlplane.metrics import ControlPlaneMetrics
from hivemesh.controlplane.replicas import EXTENSION as REPLICAS
from hivemesh.controlplane.replicas import Replica, default_replica_id, is_leader
from hivemesh.controlplane.retention_config import RetentionConfig
from hivemesh.mesh.advertise import advertised_host, peer_ip
from hivemesh.mesh.authz import allow_hint
from hivemesh.mesh.errors import (
    FailedPreconditionError,
    GrantDeniedError,
    HivemeshError,
    InvalidInputError,
    PermissionDeniedError,
    RegistryUnavailableError,
    abort,
)
from hivemesh.mesh.etcd import EtcdAccess, EtcdTls, EtcdTlsSource, parse_endpoints, wait_connected
from hivemesh.mesh.etcd import client as etcd_client
from hivemesh.mesh.etcd_roles import ensure_workload_user, reconcile_static_roles
from hivemesh.mesh.health_port import HealthPort, health_listen, parse_health_listen
from hivemesh.mesh.node_metrics import OWNED_DEFAULT, metrics_listen, parse_listen
from hivemesh.mesh.pki import (
    NAME_RE,
    Peer,
    SpiffeId,
    cert_expiry,
    parse_spiffe_id,
    peer_from_auth_context,
    spiffe_id_of,
    validate_name,
)
from hivemesh.mesh.pki import validate_trust_domain as _validate_td
from hivemesh.mesh.readiness import DEFAULT_INTERVAL_S, Readiness
from hivemesh.mesh.readiness_checks import etcd_answers
from hivemesh.mesh.reflection import ServiceRecorder, enable_reflection
from hivemesh.mesh.server import (
    CONTROLPLANE_HEALTH,
    CONTROLPLANE_JOIN,
    CONTROLPLANE_MAIN,
    METRICS,
    bind_port,
    listen_failure,
    server_options,
)
from hivemesh.mesh.tls import KeyMaterial, renewing_server_credentials
from hivemesh.v1 import control_pb2, control_pb2_grpc, mesh_pb2

log = logging.getLogger(__name__)

CA_KEY: Final = b"/hivemesh/trust/ca"
AGENTS_PREFIX: Final = b"/hivemesh/agents/"
_MAX_CERT_TTL_S: Final = 30 * 86400
_T = TypeVar("_T")


@dataclass(frozen=True)
class ControlPlaneConfig:
    """How one control plane runs."""

    etcd_endpoints: tuple[str, ...] | str
    """etcd client endpoints, "h:p,h:p" or a tuple of "h:p"."""
    certs_dir: Path
    """Where `init_ca` put ca.pem/ca.key and controlplane.pem/.key."""
    state_dir: Path
    """Private state: token signing keys (`keys/`)."""
    trust_domain: str = "hivemesh.local"
    host: str = "127.0.0.1"
    """The address both ports bind (0.0.0.0: every interface, then advertise is required)."""
    advertise: str | None = None
    """The host others dial (`address`, `join_address`, and a SAN of the server certificate); default: host."""
    port: int = 0
    """mTLS port serving ControlPlane (0: any free port)."""
    join_port: int = 0
    """Server-TLS port serving Join (0: any free port)."""
    grants_file: Path | None = None
    """When given, its grants are written to etcd at start; grants it does not name (`hivemesh allow`, `policy
    apply`) stay, and one it stops naming is deleted if it still holds what the file wrote (`seed_grants`)."""
    cert_ttl_s: int = 3600
    """Lifetime of workload certificates."""
    token_ttl_s: int = 300
    """Default token lifetime (capped at 300 s)."""
    grace_s: float = 2.0
    """How long `stop()` lets in-flight calls finish."""
    etcd_ca: Path | None = None
    """The CA of etcd's server certificate (default: the mesh bundle, certs_dir/ca.pem, which signs the
    embedded etcd's). The control plane connects with its own certificate, whose etcd user holds root."""
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    """Compaction of etcd history and deletion of finished runs, resolved escalations, stale revocations."""
    metrics_listen: str | None = None
    """HOST:PORT of the plaintext Prometheus `/metrics` port ("off": none); default $HIVEMESH_METRICS_LISTEN,
    else 127.0.0.1:0."""
    health_listen: str | None = None
    """HOST:PORT of the plaintext grpc.health.v1 port for probes ("off": none); default $HIVEMESH_HEALTH_LISTEN,
    else off."""
    health_interval_s: float = DEFAULT_INTERVAL_S
    """How often health checks that etcd answers (NOT_SERVING while it does not)."""
    replica_id: str = ""
    """This replica's name among several against one etcd (advert key, leader key); "" picks host-pid-random."""
    leader_ttl_s: int = 10
    """Lease TTL of the leader key and of the replica's advert: a dead or cut-off leader is replaced, and a dead
    replica leaves the advertised list, within it."""

    def __post_init__(self) -> None:
        eps = self.etcd_endpoints
        eps_t = tuple(e.strip() for e in eps.split(",") if e.strip()) if isinstance(eps, str) else tuple(eps)
        parse_endpoints(eps_t)  # raises ValueError naming the bad endpoint
        object.__setattr__(self, "etcd_endpoints", eps_t)
        object.__setattr__(self, "certs_dir", Path(self.certs_dir))
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.grants_file is not None:
            object.__setattr__(self, "grants_file", Path(self.grants_file))
        _validate_td(self.trust_domain)
        advertised_host(self.host, self.advertise)  # raises on a wildcard, saying to give --advertise
        if self.metrics_listen is not None:
            parse_listen(self.metrics_listen)  # raises, saying what is wrong
        if self.health_listen is not None:
            parse_health_listen(self.health_listen)
        if not self.health_interval_s > 0:
            raise ValueError(f"health_interval_s must be positive: {self.health_interval_s}")
        for name in ("port", "join_port"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 65535:
                raise ValueError(f"{name} must be 0..65535, got {value!r}")
        if not 1 <= self.cert_ttl_s <= _MAX_CERT_TTL_S:
            raise ValueError(f"cert_ttl_s must be 1..{_MAX_CERT_TTL_S}, got {self.cert_ttl_s}")
        if not 1 <= self.token_ttl_s <= MAX_TTL_S:
            raise ValueError(f"token_ttl_s must be 1..{MAX_TTL_S}, got {self.token_ttl_s}")
        if self.grace_s < 0:
            raise ValueError("grace_s must be >= 0")
        if not isinstance(self.leader_ttl_s, int) or not 2 <= self.leader_ttl_s <= 300:
            raise ValueError(f"leader_ttl_s must be 2..300 whole seconds, got {self.leader_ttl_s!r}")


def _rpc(
    method: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[_T]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[_T]]:
    """The one try/except of every RPC: typed errors go out as rich statuses, etcd trouble as
    REGISTRY_UNAVAILABLE, anything else as INTERNAL (logged, details withheld)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> _T:
        try:
            return await method(self, request, context)
        except HivemeshError as err:
            await abort(context, err)
        except aetcd.exceptions.ClientError as exc:
            unavailable = RegistryUnavailableError(f"the registry (etcd) failed: {type(exc).__name__}")
            await abort(context, unavailable)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("control plane %s failed", method.__name__)
            await abort(context, HivemeshError())
        raise AssertionError("unreachable: abort raises")

    return wrapper


class Core:
    """What both services share: the CA, the issuer, etcd and the config."""

    def __init__(
        self, config: ControlPlaneConfig, ca: CertificateAuthority, issuer: TokenIssuer, etcd: Any,
        etcd_tls: EtcdTlsSource | None = None,
    ) -> None:
        self.config = config
        self.ca = ca
        self.issuer = issuer
        self.etcd = etcd
        self.trust_domain = ca.trust_domain
        self.extensions: dict[str, Any] = {}
        """State feature services share (e.g. the audit store, used by its servicer and its interceptor)."""
        self.server_cert: tuple[bytes, bytes] = (b"", b"")
        """The control plane's own (certificate, key) PEMs; replaced during a CA rotation."""
        self._etcd_users: set[str] = set()
        self.hedged = HedgedEtcd(etcd, EtcdAccess(config.etcd_endpoints, etcd_tls) if etcd_tls else
                                 config.etcd_endpoints)
        """The issuing path's etcd requests (grants, agents, workload users), which a cut member must not fail."""

    async def ensure_etcd_user(self, spiffe_id: str) -> None:
        """Create the workload's etcd user and roles (once per process) before it gets a certificate, so the
        certificate it receives already opens exactly its part of etcd."""
        if spiffe_id not in self._etcd_users:
            sid = parse_spiffe_id(spiffe_id)
            await self.hedged.run(lambda etcd: ensure_workload_user(etcd, sid.kind, sid.name))
            self._etcd_users.add(spiffe_id)

    def sign(self, csr_pem: bytes, spiffe_id: str, peer: str = "") -> control_pb2.SignCertificateResponse:
        """Sign for spiffe_id; a remote peer's IP (gRPC peer string) becomes an IP SAN of the certificate."""
        ip = peer_ip(peer)
        cert = self.ca.sign_csr(csr_pem, spiffe_id, ttl_s=self.config.cert_ttl_s, ips=[ip] if ip else [])
        return control_pb2.SignCertificateResponse(
            certificate_pem=cert,
            ca_bundle_pem=self.ca.bundle_pem(),
            expires_at_unix=int(cert_expiry(cert)),
            spiffe_id=spiffe_id,
        )

    def peer(self, context: grpc.aio.ServicerContext[Any, Any]) -> Peer:
        return peer_from_auth_context(context.auth_context(), trust_domain=self.trust_domain)

    async def agent_instances(self, name: str | None = None) -> list[mesh_pb2.AgentInstance]:
        prefix = AGENTS_PREFIX + (name.encode() + b"/" if name else b"")
        out: list[mesh_pb2.AgentInstance] = []
        for kv in await self.hedged.run(lambda etcd: etcd.get_prefix(prefix)):
            try:
                out.append(mesh_pb2.AgentInstance.FromString(kv.value))
            except DecodeError:
                log.warning("skipping unparsable agent instance at %s", kv.key.decode(errors="replace"))
        return out


def _requested_identity(csr: x509.CertificateSigningRequest, name: str, trust_domain: str) -> SpiffeId:
    """The identity a joining CSR asks for (its URI SAN spiffe://<td>/<kind>/<name>): the join token must have
    been minted for exactly that kind and name, so an agent token never makes a client, nor the reverse."""
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    except (ValueError, x509.DuplicateExtension) as exc:  # extensions that do not parse, or one twice
        msg = f"the CSR's extensions cannot be read: {exc}"
        raise InvalidInputError(msg, field_violations={"csr_pem": msg}) from None
    ids = [u for u in uris if u.startswith("spiffe://")]
    msg = (f"the CSR must name the identity it asks for as one URI SAN spiffe://{trust_domain}/<kind>/{name} "
           f"(kind agent or client)")
    if len(ids) != 1:
        raise InvalidInputError(msg, field_violations={"csr_pem": msg})
    try:
        wanted = parse_spiffe_id(ids[0])
    except ValueError:
        raise InvalidInputError(msg, field_violations={"csr_pem": msg}) from None
    if wanted.trust_domain != trust_domain or wanted.name != name or wanted.kind not in joins.JOIN_KINDS:
        raise InvalidInputError(f"{msg}; it asks for {ids[0]}", field_violations={"csr_pem": msg})
    return wanted


class JoinServicer(control_pb2_grpc.JoinServicer):
    """Join.SignCertificate: one certificate per one-time join token."""

    def __init__(self, core: Core) -> None:
        self._core = core

    @_rpc
    async def SignCertificate(
        self, request: control_pb2.SignCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.SignCertificateResponse:
        # The CSR is checked before the token is consumed, so a client bug does not burn the token.
        csr = self._core.ca.check_csr(request.csr_pem)
        try:
            validate_name(request.name)
        except ValueError as exc:
            raise InvalidInputError(str(exc), field_violations={"name": str(exc)}) from None
        requested = _requested_identity(csr, request.name, self._core.trust_domain)
        token = await joins.check(self._core.etcd, request.join_token, request.name, requested.kind)
        spiffe_id = f"spiffe://{self._core.trust_domain}/{token.kind}/{token.name}"
        # The token is spent last: a failure before (etcd a moment away while the user is made) leaves it for
        # the caller's retry, which would otherwise need a new token from an operator.
        await self._core.ensure_etcd_user(spiffe_id)
        resp = self._core.sign(request.csr_pem, spiffe_id, context.peer())
        await joins.use(self._core.etcd, token)
        log.info("joined %s (certificate until %d)", spiffe_id, resp.expires_at_unix)
        return resp


class ControlPlaneServicer(control_pb2_grpc.ControlPlaneServicer):
    """ControlPlane over mutual TLS: the caller is whoever its certificate says."""

    def __init__(self, core: Core) -> None:
        self._core = core

    @_rpc
    async def RenewCertificate(
        self, request: control_pb2.SignCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.SignCertificateResponse:
        peer = self._core.peer(context)
        await self._core.ensure_etcd_user(str(peer.spiffe_id))
        return self._core.sign(request.csr_pem, str(peer.spiffe_id), context.peer())

    @_rpc
    async def IssueToken(
        self, request: control_pb2.IssueTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.IssueTokenResponse:
        core = self._core
        peer = core.peer(context)
        audience = _agent_audience(request.audience, core.trust_domain)
        requested = _requested_scopes(request.scopes)
        if request.ttl_seconds < 0:
            msg = "ttl_seconds must not be negative"
            raise InvalidInputError(msg, field_violations={"ttl_seconds": msg})
        # Grants and the registry are read per request: IssueToken is off the call path (tokens are cached).
        grants = await core.hedged.run(GrantSet.from_etcd)
        instances = await core.agent_instances(audience.name)
        offered = sorted({c.name for i in instances for c in i.card.capabilities}) if instances else None
        subject = str(peer.spiffe_id)
        scopes = grants.allowed(subject, str(audience), requested, offered)
        if not scopes:
            wanted = ", ".join(requested) if requested else "any capability"
            unlisted = offered is None and not requested and grants.matches_any(subject, str(audience))
            metadata = {"subject": subject, "audience": str(audience)}
            if unlisted:
                metadata["ask_by_name"] = "true"  # TokenSource.get then asks for the capability it calls
            raise GrantDeniedError(
                f"no grant allows {subject} {wanted} on {audience}"
                + ("" if offered is None else f" (it offers: {', '.join(offered) or 'nothing'})")
                + (_UNLISTED if unlisted else _grant_hint(subject, requested, offered, str(audience))),
                metadata=metadata,
            )
        issued = core.issuer.issue(
            subject, str(audience), scopes, ttl_s=request.ttl_seconds or None, cnf_thumbprint=peer.thumbprint
        )
        return control_pb2.IssueTokenResponse(
            token=issued.token, expires_at_unix=int(issued.expires_at), scopes=issued.scopes, jti=issued.jti
        )

    @_rpc
    async def GetJwks(
        self, request: control_pb2.GetJwksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.GetJwksResponse:
        self._core.peer(context)
        return control_pb2.GetJwksResponse(jwks_json=self._core.issuer.keys.jwks_json())

    @_rpc
    async def CreateJoinToken(
        self, request: control_pb2.CreateJoinTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.CreateJoinTokenResponse:
        peer = self._core.peer(context)
        if peer.spiffe_id.kind != "operator":
            raise PermissionDeniedError(f"only operators may create join tokens; {peer.spiffe_id} is not one")
        kind = request.kind or "agent"
        ttl = request.ttl_seconds or joins.DEFAULT_TTL_S
        token = await joins.create(self._core.etcd, request.name, kind, ttl)
        log.info("%s created a join token for %s %s (ttl %d s)", peer.spiffe_id, kind, request.name, ttl)
        return control_pb2.CreateJoinTokenResponse(token=token, expires_at_unix=int(time.time()) + ttl)

    @_rpc
    async def ListAgents(
        self, request: control_pb2.ListAgentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> control_pb2.ListAgentsResponse:
        self._core.peer(context)
        return control_pb2.ListAgentsResponse(instances=await self._core.agent_instances())


def _agent_audience(audience: str, trust_domain: str) -> SpiffeId:
    try:
        sid = parse_spiffe_id(audience)
    except ValueError as exc:
        raise InvalidInputError(str(exc), field_violations={"audience": str(exc)}) from None
    if sid.kind != "agent" or sid.trust_domain != trust_domain:
        msg = f"the audience must be an agent in {trust_domain} (spiffe://{trust_domain}/agent/<name>)"
        raise InvalidInputError(msg, field_violations={"audience": msg})
    return sid


MAX_SCOPES: Final = 256
"""The most capability names a token request may list (`scopes`, an exchange's `delegable`): far more than an
agent offers, and a token naming many more would pass the verifiers' 8 KiB token bound anyway."""


def _requested_scopes(scopes: Sequence[str], field: str = "scopes") -> list[str]:
    """The capability names asked for, sorted and unique; INVALID_ARGUMENT naming field for too many (counted
    before any per-name work: any workload may ask, and an 8 MiB list held the event loop ~1 s) or a bad name."""
    if len(scopes) > MAX_SCOPES:
        msg = f"at most {MAX_SCOPES} capability names"
        raise InvalidInputError(f"{field}: {msg}, got {len(scopes)}", field_violations={field: msg})
    bad = [s for s in scopes if not NAME_RE.fullmatch(s)]
    if bad:
        shown = ", ".join(map(repr, bad[:5]))
        msg = f"{field} must be capability names ([a-z0-9][a-z0-9._-]{{0,62}}); bad: {shown}"
        raise InvalidInputError(msg, field_violations={field: msg})
    return sorted(set(scopes))


def _dynamic_credentials(core: Core, *, require_client_auth: bool) -> grpc.ServerCredentials:
    """Server credentials read from core at each handshake, so a CA rotation (new trust bundle, re-issued
    server certificate) takes effect for new connections without a restart."""

    def current() -> KeyMaterial:
        cert, key = core.server_cert
        return cert, key, core.ca.bundle_pem() if require_client_auth else None

    return renewing_server_credentials(current, require_client_auth=require_client_auth)


_UNLISTED = (" that can be listed: it has no registered instance, and the grants that match name its capabilities "
             "by pattern only; ask for a capability by name")
"""Why "any capability" found nothing although a grant matches: the control plane lists "any capability" from the
audience's registered instances, and sees none (its lease lapsed and is being renewed, or it left). A token source
then asks by name (`TokenSource.get`), which the grants judge alone."""


def _grant_hint(subject: str, requested: Sequence[str], offered: Sequence[str] | None, audience: str) -> str:
    """The `hivemesh allow` that would let IssueToken grant what was asked: the requested capabilities the agent
    offers (none: a grant would not help), or for a token for any capability the agent's only one, else a
    placeholder (the caller's token covers every capability, not the one it calls: a hint naming them all would
    grant more than the call needs)."""
    if requested:
        fix = [c for c in requested if offered is None or c in offered]
        return allow_hint(subject, fix, audience) if fix else ""
    if offered is not None and not offered:
        return ""
    return allow_hint(subject, offered if offered is not None and len(offered) == 1 else [], audience)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ControlServer(ServiceRecorder):
    """A control-plane server as installers see it: it notes the services they add, and holds its health."""

    def __init__(self, server: grpc.aio.Server) -> None:
        super().__init__(server)
        self.health = health.aio.HealthServicer()
        self.served: tuple[str, ...] = ()
        """The services installed on it (health and reflection aside), once `_serve_reflection` ran."""


class ControlPlaneServer:
    """The control plane as an object: `await start()`, `await stop()`, or `async with`."""

    def __init__(self, config: ControlPlaneConfig) -> None:
        self.config = config
        self.port = 0
        self.join_port = 0
        self.etcd: Any = None
        self.ca: CertificateAuthority | None = None
        self._core: Core | None = None
        self.replica: Replica | None = None
        """This process among the control-plane replicas (leadership, advert) once started."""
        self._servers: list[grpc.aio.Server] = []
        self.readiness = Readiness()
        """Whether the control plane can do its job (NOT_SERVING while etcd does not answer, and when stopping)."""
        self._controls: list[_ControlServer] = []
        self.health_port: HealthPort | None = None
        """The plaintext health port (None: off)."""
        self._interceptors: list[grpc.aio.ServerInterceptor] = []
        self._features: list[Any] = []
        self.metrics: ControlPlaneMetrics | None = None
        """Serving `/metrics` once started (None: off)."""

    @property
    def advertised_host(self) -> str:
        return advertised_host(self.config.host, self.config.advertise)

    @property
    def keys(self) -> SigningKeys | None:
        """The token signing keys in use (replaced when another replica adds or retires one)."""
        return self._core.issuer.keys if self._core is not None else None

    @property
    def address(self) -> str:
        return _address(self.advertised_host, self.port)

    @property
    def join_address(self) -> str:
        return _address(self.advertised_host, self.join_port)

    @property
    def health_address(self) -> str | None:
        """The plaintext health port's HOST:PORT once started (None: off)."""
        return self.health_port.address if self.health_port is not None and self.health_port.port else None

    async def start(self) -> None:
        """Load the CA and signing keys, publish trust material to etcd, bind both ports and serve."""
        cfg = self.config
        ca = load_ca(cfg.certs_dir)
        if ca.trust_domain != cfg.trust_domain:
            raise FailedPreconditionError(
                f"the CA in {cfg.certs_dir} is for trust domain {ca.trust_domain}, not {cfg.trust_domain}"
            )
        ensure_controlplane_cert(ca, cfg.certs_dir, hosts=[self.advertised_host])
        grants = load_grants(cfg.grants_file) if cfg.grants_file is not None else None
        files = CaFiles.in_dir(cfg.certs_dir)
        cp_cert, cp_key = files.controlplane_cert.read_bytes(), files.controlplane_key.read_bytes()

        def etcd_tls() -> EtcdTls:
            """Read at every reconnect, not once: during a CA rotation etcd restarts on a new bundle (`hivemesh up`
            at `prepare` and `finish`), and only the files of now (the bundle, and this certificate re-issued at
            `activate`) pass its handshake then; the client moves to them (`_TlsClient`) without a restart."""
            return controlplane_etcd_tls(cfg.certs_dir, cfg.etcd_ca)

        self.etcd = etcd_client(cfg.etcd_endpoints, tls=etcd_tls)
        try:
            await wait_connected(self.etcd)
            # The mesh's CA, which may have rotated since this folder was written; the folder is its cache.
            await shared_ca.load(self.etcd, cfg.certs_dir)
            ca, (cp_cert, cp_key) = await asyncio.to_thread(shared_ca.follow_local, cfg.certs_dir,
                                                            [self.advertised_host])
            if ca.trust_domain != cfg.trust_domain:
                raise FailedPreconditionError(
                    f"the mesh's CA (etcd) is for trust domain {ca.trust_domain}, not {cfg.trust_domain}"
                )
            op = parse_spiffe_id(spiffe_id_of(files.operator_cert.read_bytes()))
            await ensure_workload_user(self.etcd, op.kind, op.name)  # the CLI's identity, issued offline
            for change in await reconcile_static_roles(self.etcd):  # a store bootstrapped by an older version
                log.warning("etcd role %s", change)
            keys, keys_revision = await shared_keys.load(self.etcd, cfg.state_dir)  # one set for every replica
            issuer = TokenIssuer(keys, ca.trust_domain, default_ttl_s=cfg.token_ttl_s)
            await keys.publish(self.etcd, CaRotation(cfg.certs_dir).signers(ca))  # signed by the roots
            await self.etcd.put(CA_KEY, ca.bundle_pem())
            if grants is not None:  # the file's own grants only: allow's and policy apply's stay (seed_grants)
                seeded = await seed_grants(self.etcd, grants)
                log.info("grants file %s: %s", cfg.grants_file, seeded.summary())
                for name in seeded.taken:
                    log.warning("grants file %s replaced grant %s, which it had not written: it is the file's now",
                                cfg.grants_file, name)
                for name in seeded.kept:
                    log.warning("grant %s is no longer in grants file %s but was changed since the file wrote it: "
                                "kept (`hivemesh policy delete grants %s` removes it)", name, cfg.grants_file, name)
            core = Core(cfg, ca, issuer, self.etcd, etcd_tls)
            core.server_cert = (cp_cert, cp_key)
            self._core = core
            # Leadership first: a lone replica leads before its once-per-mesh duties (retention) first ask.
            replica = Replica(core, cfg.replica_id or default_replica_id(), ttl_s=cfg.leader_ttl_s,
                              keys_revision=keys_revision)
            core.extensions[REPLICAS] = replica
            self.replica = replica
            await replica.start()
            from hivemesh.controlplane.services import installers, interceptors  # feature services, lazily

            # Interceptors (the audit of every control-plane decision, then the decode guard: a typed request
            # that does not decode is INVALID_ARGUMENT, not UNKNOWN, and audited) must exist before the servers do.
            self._interceptors = [make(core) for make in interceptors()]
            main = self._new_server()
            control_pb2_grpc.add_ControlPlaneServicer_to_server(ControlPlaneServicer(core), main)
            for install in installers():
                feature = install(core, main)
                if feature is not None:
                    self._features.append(feature)
            self._serve_reflection(main)
            self.port = bind_port(main, _address(cfg.host, cfg.port),
                                  _dynamic_credentials(core, require_client_auth=True), CONTROLPLANE_MAIN)
            join = self._new_server()
            control_pb2_grpc.add_JoinServicer_to_server(JoinServicer(core), join)
            self._serve_reflection(join)
            self.join_port = bind_port(join, _address(cfg.host, cfg.join_port),
                                       _dynamic_credentials(core, require_client_auth=False), CONTROLPLANE_JOIN)
            for feature in self._features:
                await feature.start()
            for control in self._controls:
                await self.readiness.attach(control.health, control.served)
            for server in self._servers:
                await server.start()
            for feature in self._features:  # e.g. the audit of TLS handshakes refused on these ports
                serving = getattr(feature, "serving", None)
                if serving is not None:
                    await serving(cfg.host, [self.port, self.join_port])
            await replica.advertise(self.address, self.join_address)
            self._start_metrics(core)
            await self._start_health(cfg)
        except BaseException:
            await self._teardown(0)
            raise
        self.ca = ca
        log.info(
            "control plane for %s serving mTLS on %s and joins on %s", ca.trust_domain, self.address,
            self.join_address,
        )

    def _start_metrics(self, core: Core) -> None:
        listen = metrics_listen(self.config.metrics_listen, OWNED_DEFAULT)
        if listen is None:
            return
        m = ControlPlaneMetrics(listen)
        from hivemesh.controlplane.audit.store import EXTENSION  # the audit feature imports this module

        store = core.extensions.get(EXTENSION)
        if store is not None:
            m.watch_audit(store)
        for feature in self._features:
            m.watch_handshakes(list(getattr(feature, "handshakes", ())))
        m.watch_escalations(core.etcd)
        m.watch_leader(functools.partial(is_leader, core))
        try:
            m.start()
        except OSError as exc:  # the HTTP server's own words name no address: "[Errno 98] Address already in use"
            raise listen_failure(listen, METRICS["controlplane"], cause=exc) from None
        self.metrics = m

    async def _start_health(self, cfg: ControlPlaneConfig) -> None:
        """Serve once etcd answers (checked now and every health_interval_s), on the plaintext port too."""
        probe = etcd_answers(self.etcd, ",".join(cfg.etcd_endpoints), CA_KEY, min(1.0, cfg.health_interval_s))
        listen = health_listen(cfg.health_listen)
        if listen is not None:
            self.health_port = HealthPort(listen, CONTROLPLANE_HEALTH)
            await self.health_port.start(self.readiness, sorted({n for c in self._controls for n in c.served}))
        self.readiness.watch("etcd", probe, cfg.health_interval_s)
        await self.readiness.ready()

    @staticmethod
    def _serve_reflection(control: _ControlServer) -> None:
        """Reflection and health name every service installed on the server (so grpcurl lists them all)."""
        control.served = tuple(control.names)
        enable_reflection(control, control.served)

    def _new_server(self) -> _ControlServer:
        server = grpc.aio.server(
            interceptors=self._interceptors,
            options=server_options(),
        )
        self._servers.append(server)
        control = _ControlServer(server)
        health_pb2_grpc.add_HealthServicer_to_server(control.health, server)
        self._controls.append(control)
        return control

    async def _teardown(self, grace: float) -> None:
        if self.metrics is not None:
            metrics, self.metrics = self.metrics, None
            await metrics.stop()
        await self.readiness.close()
        if self.health_port is not None:
            port, self.health_port = self.health_port, None
            await port.stop()
        if self.replica is not None:  # hand leadership over and withdraw the advert at once, not after the grace
            replica, self.replica = self.replica, None
            await replica.stop()
        servers, self._servers = self._servers, []
        self._controls = []
        await asyncio.gather(*(s.stop(grace) for s in servers), return_exceptions=True)
        features, self._features = self._features, []
        for feature in reversed(features):
            try:
                await feature.stop()
            except Exception:
                log.exception("control-plane feature %r did not stop cleanly", feature)
        if self._core is not None:
            await self._core.hedged.close()
        if self.etcd is not None:
            etcd, self.etcd = self.etcd, None
            with contextlib.suppress(Exception):
                await etcd.close()

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish within grace seconds, then close."""
        await self.readiness.drain()
        await self._teardown(self.config.grace_s if grace is None else grace)

    async def __aenter__(self) -> ControlPlaneServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def main(
    config: ControlPlaneConfig, *, on_started: Callable[[ControlPlaneServer], None] | None = None
) -> None:
    """Run a control plane until SIGINT or SIGTERM, then shut down gracefully (health NOT_SERVING first).

    on_started, if given, is called once both ports are bound (e.g. for the CLI to print the addresses).
    """
    server = ControlPlaneServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGINT, signal.SIGTERM)
    for sig in sigs:
        loop.add_signal_handler(sig, stop.set)
    try:
        if on_started is not None:
            on_started(server)
        await stop.wait()
        log.info("control plane shutting down")
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)
        await server.stop()
