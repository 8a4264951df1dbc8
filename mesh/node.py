"""A process's membership in the mesh: its identity, its view of the registry and trust, and its outbound path.

Every mesh participant (an SDK agent, a MeshClient, a sidecar) holds one MeshNode. It owns the long-lived,
shared state the layers read on the call path (registry index, key set, channels, tokens), so that state is
built once per process and kept fresh in the background, never fetched per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import grpc

from hivemesh.mesh import tracing
from hivemesh.mesh.authz import AUTHZ
from hivemesh.mesh.budget import BUDGETS
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.controlplane_discovery import ReplicaDiscovery
from hivemesh.mesh.errors import (
    FailedPreconditionError,
    HivemeshError,
    JoinTokenInvalidError,
    JoinTokenRequiredError,
    StoredIdentityMismatchError,
)
from hivemesh.mesh.etcd import EtcdAccess, EtcdTls
from hivemesh.mesh.identity_store import IdentityStore, TrustFloor, join_hint
from hivemesh.mesh.node_metrics import NodeMetrics
from hivemesh.mesh.outbound import OutboundPipeline
from hivemesh.mesh.outbound.channels import ChannelPool
from hivemesh.mesh.outbound.link import link_enabled
from hivemesh.mesh.outbound.selection import Liveness
from hivemesh.mesh.pki import controlplane_id, load_certs
from hivemesh.mesh.policy import PolicyCache, PolicyKind
from hivemesh.mesh.providers import PROVIDERS
from hivemesh.mesh.registry import RegistryView, default_instance_id
from hivemesh.mesh.resilience.kinds import TRAFFIC_KINDS
from hivemesh.mesh.resilience.traffic import Traffic, TrafficState
from hivemesh.mesh.resilience.view import PolicyView
from hivemesh.mesh.revocation import RevocationWatch
from hivemesh.mesh.settings import MeshSettings
from hivemesh.mesh.status import StatusPublisher, status_key
from hivemesh.mesh.tls import KeyMaterial, Workload, join, load_workload_files, renewing_server_credentials
from hivemesh.mesh.token_source import TokenSource
from hivemesh.mesh.tokens import KeySet, RevocationList, TokenVerifier
from hivemesh.mesh.trustdoc import TRUST_BUNDLE_KEY, fingerprint, issued_by, verify_jwks, verify_trust_doc
from hivemesh.mesh.watch import PrefixCache
from hivemesh.v1 import policy_pb2

log = logging.getLogger(__name__)

JWKS_KEY = "/hivemesh/trust/jwks"
NODE_POLICY_KINDS: Final = (*TRAFFIC_KINDS, AUTHZ, BUDGETS, PROVIDERS)
"""The policy kinds every node's layers read: traffic (resilience), authorization, token budgets (the
inbound chain's budget layer, in both packagings), and providers (its registry view lists only the instances
allowed to serve each capability, so every caller routes only to them)."""
_RENEW_AT = 0.5  # of the certificate's lifetime, ±10% jitter so a fleet does not renew at once


def renewal_delay(remaining_s: float) -> float:
    """Seconds until a certificate with remaining_s left is renewed: half of it, ±10% jitter (45–55%), so a
    fleet issued at once does not renew at once (SPIRE's rotationutil)."""
    # NOTE: measured from now, not issuance: a restarted process renews at half of what is left.
    return max(remaining_s, 0.0) * _RENEW_AT * random.uniform(0.9, 1.1)


def renewal_retry_delay(attempt: int, remaining_s: float) -> float:
    """Seconds before retrying a failed renewal: backoff 1, 2, 4 … 30 s, but never past the certificate's expiry
    (remaining_s from now), so a node whose renewal keeps failing reports the expiry when it happens, not up to
    30 s later while it still advertises itself with a dead certificate."""
    backoff = min(2.0 ** min(attempt, 5), 30.0)
    return min(backoff, remaining_s + 0.1) if remaining_s > 0 else backoff


def describe_failure(exc: BaseException) -> str:
    """exc named for a message saying why a start failed: its type, and its message if it has one."""
    if isinstance(exc, asyncio.CancelledError):
        return "it was cancelled"
    text = exc.message if isinstance(exc, HivemeshError) else str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class MeshNode:
    """Identity + registry view + key set + outbound pipeline for one process.

    Args:
        settings: where the mesh is.
        name: workload name (agent name, client name).
        kind: "agent", "client" or "operator" (the SPIFFE id's kind).
        verify_inbound: keep the token key set in sync (needed by anything that serves calls).
        instance_id: this process's instance id (its registry id when it serves; names its status entry).
        publish_status: publish traffic status to etcd every ~2 s for `hivemesh status`.
        policy_kinds: policy kinds to mirror besides the node's own (`NODE_POLICY_KINDS`), for what else this
            process enforces (an SDK server adds `budgets`).
        link: send unary calls over multiplexed links (`hivemesh.mesh.outbound.link`); None: $HIVEMESH_LINK, else on.
    """

    def __init__(
        self,
        settings: MeshSettings,
        *,
        name: str,
        kind: str = "client",
        verify_inbound: bool = False,
        instance_id: str | None = None,
        publish_status: bool = True,
        policy_kinds: Iterable[PolicyKind[Any]] = (),
        metrics: NodeMetrics | None = None,
        link: bool | None = None,
    ):
        self.settings = settings
        self.link = link_enabled(link)
        """Unary calls go to each peer as frames on one multiplexed link (None: $HIVEMESH_LINK, else on)."""
        self.name = name
        self.kind = kind
        self.instance_id = instance_id or default_instance_id()
        self._publish_status = publish_status
        self.metrics = metrics
        """This node's Prometheus metrics and their port (None: off); started and stopped with the node."""
        self.etcd = EtcdAccess(settings.etcd, self._etcd_tls)
        """etcd as this workload: mutual TLS with its own (current) certificate, whose etcd user's roles allow
        exactly what its data plane reads and its own registration and status (mesh/etcd_roles.py)."""
        # Policies are mirrored and compiled in the background; `traffic` is what the layers read.
        self.policies = PolicyCache(self.etcd, kinds=(*NODE_POLICY_KINDS, *policy_kinds))
        self.traffic = Traffic(PolicyView(self.policies), TrafficState())
        self._status: StatusPublisher | None = None
        self.status_extras: list[Callable[[policy_pb2.NodeTraffic], None]] = []
        """What other parts of this node add to its published status (e.g. the TLS handshake audit's state)."""
        self._verify_inbound = verify_inbound
        self._workload: Workload | None = None
        self.revocations = RevocationList()
        self._revocation_watch: RevocationWatch | None = None
        self._replicas: ReplicaDiscovery | None = None
        self._bundle: PrefixCache[bytes] | None = None
        self._bundle_generation = 0
        self.bundle_rejections = 0
        """Trust bundles from etcd refused (unsigned, signed by a root not trusted, or older than the one held)."""
        self._renew_now = asyncio.Event()
        self.renewals = 0
        self.registry = RegistryView(self.etcd, trust_domain=settings.trust_domain,
                                     providers=lambda: self.policies.get(PROVIDERS))
        self.keyset = KeySet()
        self._jwks_issued_at_ns = 0
        self._jwks_refused = False
        self.jwks_rejections = 0
        """Key sets from etcd refused (unsigned, signed by an untrusted root, or older than the one held)."""
        self._trust: PrefixCache[bytes] | None = None
        self._cp: ControlPlaneClient | None = None
        self._tokens: TokenSource | None = None
        self._channels: ChannelPool | None = None
        self.liveness = Liveness(self.registry)
        self._outbound: OutboundPipeline | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False
        self._opening: asyncio.Task[None] | None = None
        """start()'s work, as a task of its own: stop() cancels it, so a stop during a start ends it at once."""
        self._failed: BaseException | None = None
        """Why the start failed part-way (what it opened was released; its watches cannot restart)."""
        self._stopped_starting = False
        """stop() ran while start() was in progress."""
        self._past_identity = False
        """start() went past obtaining the identity: a failure from then on leaves watches that cannot restart."""
        self.workload_listeners: list[Callable[[Workload], None]] = []
        """Told each new workload at once (a renewed certificate, a new trust bundle): what serves TLS outside gRPC's
        credentials (a direct-link listener) takes it for its next handshakes."""
        self.certificate_hooks: list[Callable[[str, Workload], Awaitable[None]]] = []
        """Told ("renewed", new workload) after each renewal, and once ("expired", workload) when the certificate
        expired and renewal still fails (see `hivemesh.mesh.cert_presence`)."""

    def _etcd_tls(self) -> EtcdTls:
        """The identity etcd sees, read at each (re)connect so a renewed certificate is used from then on."""
        w = self._workload
        if w is None:
            raise HivemeshError(f"{self.kind} {self.name!r} has no identity yet: start() obtains it")
        return EtcdTls(w.bundle_pem, w.cert_pem, w.key_pem)

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def start(self, *, timeout: float = 15.0) -> None:
        """Obtain an identity (existing files or a one-time join), then load the registry and trust state.
        A no-op on a started node; a stopped one, or one whose start failed, is refused before anything (its
        watches cannot restart, and a half-redone start would renew its identity for nothing).

        The work runs as a task of its own that stop() cancels: a stop() during start() ends it at once, with what
        it opened released, and start() then raises FailedPreconditionError (a watch stopped under it left it
        waiting its whole timeout for an etcd that was fine, or failing with "a stopped PrefixCache cannot be
        restarted"). Cancelling the caller's task cancels the work too."""
        refusal = self._refusal()
        if refusal is not None:
            raise FailedPreconditionError(refusal)
        if self._started:
            return
        opening = self._opening
        if opening is None:
            opening = self._opening = asyncio.get_running_loop().create_task(self._open(timeout))
        try:
            await opening
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the caller's own task was cancelled (the work with it)
            raise FailedPreconditionError(self._refusal() or f"{self.kind} {self.name!r} could not start") from None
        if self._stopped:  # stop() ran once the work was done, before this caller resumed: it released everything
            self._stopped_starting = True
            raise FailedPreconditionError(self._refusal() or "")

    def _refusal(self) -> str | None:
        """Why start() is refused now (None: it is not)."""
        who = f"{self.kind} {self.name!r}"
        if self._stopped:
            if self._stopped_starting:
                return f"{who} was stopped while it was starting: create a new one"
            return f"{who} was stopped and cannot start again: create a new one"
        if self._failed is not None:
            return (f"{who} cannot start again: its earlier start failed ({describe_failure(self._failed)}): "
                    "create a new one")
        return None

    async def _open(self, timeout: float) -> None:
        """start()'s work. A failure once past the identity (a cancellation by stop() included) releases what it
        opened and marks the node failed, its watches being unable to restart; one before (a join refused, the
        control plane away) leaves it as new, for a later start()."""
        try:
            await self._open_parts(timeout)
        except BaseException as exc:
            if not self._past_identity:  # nothing opened that cannot open again: a later start() may retry
                self._opening = None
                if self._cp is not None:
                    cp, self._cp = self._cp, None
                    await cp.close()
                raise
            self._failed = exc
            await self._release()
            raise

    async def _open_parts(self, timeout: float) -> None:
        tracing.configure(service=self.name)  # off unless the OTEL_* environment asks (hivemesh.mesh.tracing)
        s = self.settings
        if s.cert_file is not None and s.key_file is not None:
            self._workload = load_workload_files(s.cert_file, s.key_file, s.ca_bundle)
            self._cp = ControlPlaneClient(s.controlplane, self._workload, s.trust_domain)
        else:
            self._workload, self._cp = await self._stored_or_joined()
            store = self._identity_store()
            if store is not None:  # before the watches: nothing older than last adopted, restart or not
                floor = store.load_floor()
                self._bundle_generation, self._jwks_issued_at_ns = floor.bundle_generation, floor.jwks_issued_at_ns
        self._past_identity = True
        self._tokens = TokenSource(self._cp)
        self._channels = ChannelPool(self._workload, link=self.link)
        self._outbound = OutboundPipeline(self.liveness, self._tokens, self._channels, traffic=self.traffic,
                                          authz=lambda: self.policies.get(AUTHZ), events=self.metrics)
        await self.registry.start(timeout=timeout)
        await self.policies.start(timeout=timeout)
        # The signed trust bundle (CA rotation): every node, callers too, must follow it.
        self._bundle = PrefixCache(self.etcd, TRUST_BUNDLE_KEY, on_change=self._on_bundle_change)
        await self._bundle.start(timeout=timeout)
        self._replicas = ReplicaDiscovery(self.etcd, lambda: self._cp)  # control-plane replicas to fail over to
        await self._replicas.start()
        if self._verify_inbound:
            self._revocation_watch = RevocationWatch(self.etcd, self.revocations)
            await self._revocation_watch.start(timeout=timeout)
            self._trust = PrefixCache(self.etcd, JWKS_KEY, on_change=self._on_trust_change)
            await self._trust.start(timeout=timeout)
            if not await self._trust.wait_for(lambda snap: bool(self.keyset.kids), timeout):
                raise HivemeshError(
                    "no signed token keys published in etcd: is the control plane running? (see the log for "
                    "a key set refused)"
                )
        # From here on nothing awaits: stop() finds the node either still starting or started.
        if self.metrics is not None:
            self.metrics.watch_node(self)
            self.metrics.start()
        self._renew_task = asyncio.get_running_loop().create_task(self._renew_loop())
        if self._publish_status:
            self._status = StatusPublisher(
                self.etcd,
                status_key(self.kind, self.name, self.instance_id),
                self._status_snapshot,
            )
            self._status.start()
        self._started = True

    async def _stored_or_joined(self) -> tuple[Workload, ControlPlaneClient]:
        """The identity kept in the state folder, renewed at once; else a join with the one-time token.

        A stored identity wins over a join token (a restart must not need, nor burn, a new one). A new join token
        is needed only when the stored certificate expired, was issued by a CA the mesh no longer trusts, or the
        control plane refuses to renew it (revoked): with no token, the error says which.
        """
        s = self.settings
        store = None if s.identity_dir is None else IdentityStore(s.identity_dir, self.name, self.kind, s.trust_domain)
        unusable: HivemeshError | None = None
        if store is not None:
            try:
                stored = store.load(s.ca_bundle.read_bytes())
            except StoredIdentityMismatchError:
                raise
            except JoinTokenRequiredError as exc:
                stored, unusable = None, exc
            if stored is not None:
                cp = ControlPlaneClient(s.controlplane, stored, s.trust_domain)
                try:
                    renewed = await cp.renew()
                except HivemeshError as exc:
                    if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        # The control plane is away: serve on the stored certificate; the renew loop retries.
                        log.warning("could not renew the stored identity %s at start (%s); using it as it is",
                                    stored.spiffe_id, exc.message)
                        return stored, cp
                    await cp.close()
                    unusable = JoinTokenRequiredError(
                        f"the control plane refused to renew the identity stored in {store.folder} "
                        f"({exc.reason}: {exc.message}): {join_hint(self.kind, self.name)}",
                        metadata={"spiffe_id": stored.spiffe_id, "cause": exc.reason},
                    )
                except BaseException:  # cancelled (a stop() during start): cp is not the node's yet to close
                    await cp.close()
                    raise
                else:
                    self._save(store, renewed)
                    log.info("%s %s: reusing its stored identity %s", self.kind, self.name, renewed.spiffe_id)
                    return renewed, cp
        if not s.join_token:
            if unusable is not None:
                raise unusable
            raise JoinTokenRequiredError(
                f"{self.kind} {self.name!r} has no identity: give a join token (HIVEMESH_JOIN_TOKEN) "
                "or a certificate and key (HIVEMESH_CERT, HIVEMESH_KEY)"
            )
        if unusable is not None:
            log.info("joining with the join token given: %s", unusable.message)
        try:
            workload = await join(
                s.join, s.ca_bundle.read_bytes(), s.join_token, self.name, self.kind, trust_domain=s.trust_domain
            )
        except JoinTokenInvalidError as exc:
            if unusable is None:
                raise
            # Typically the token of the first start, long consumed: the stored identity's trouble is the news.
            raise JoinTokenRequiredError(
                f"{unusable.message} (the join token given was refused too: {exc.message})",
                metadata=unusable.metadata,
            ) from exc
        if store is not None:
            self._save(store, workload)
        return workload, ControlPlaneClient(s.controlplane, workload, s.trust_domain)

    def _save(self, store: IdentityStore, workload: Workload) -> None:
        """Keep workload for the next start; a failed write is logged, never fatal (the node still runs)."""
        try:
            store.save(workload)
        except OSError as exc:
            log.error("could not keep the identity in %s (the next start will need a join token): %s",
                      store.folder, exc)

    def _status_snapshot(self) -> policy_pb2.NodeTraffic:
        snap = self.traffic.state.snapshot(
            identity=self.workload.spiffe_id, instance=self.instance_id,
            agent=self.name if self.kind == "agent" else "", policy_revision=self.traffic.policy.revision,
        )
        if self.metrics is not None:  # so `hivemesh top` finds nodes `hivemesh up` did not start
            snap.metrics_address = self.metrics.address
        for cap in snap.capabilities:  # which instances this node's balancing skips now, and why
            for inst in cap.instances:
                inst.avoided = self.liveness.avoided(inst.instance)
        for fill in list(self.status_extras):
            fill(snap)
        return snap

    async def stop(self) -> None:
        """Release everything, for good (see `stopped`); idempotent. A start() in progress is cancelled first (it
        releases what it opened, and raises FailedPreconditionError)."""
        self._stopped = True
        opening = self._opening
        if opening is not None and not opening.done() and opening is not asyncio.current_task():
            self._stopped_starting = True
            opening.cancel()
            await asyncio.wait((opening,))  # its own release; ours below finishes one it could not
        await self._release()

    async def _release(self) -> None:
        """Close whatever is open (each part idempotently: a release cut short is finished by the next)."""
        if self._renew_task is not None:
            self._renew_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renew_task
            self._renew_task = None
        if self._status is not None:
            await self._status.stop()
            self._status = None
        if self._trust is not None:
            await self._trust.stop()
        if self._revocation_watch is not None:
            await self._revocation_watch.stop()
        if self._replicas is not None:
            await self._replicas.stop()
        if self._bundle is not None:
            await self._bundle.stop()
        await self.policies.stop()
        await self.registry.stop()
        if self._outbound is not None:
            await self._outbound.shadow.close()  # mirrored calls in flight: nobody waits for them
        if self._tokens is not None:
            await self._tokens.close()
        if self._channels is not None:
            await self._channels.close()
        # Dropped, so nothing routes on the registry view no longer kept fresh, nor reopens channels (`outbound`).
        self._outbound = self._tokens = self._channels = None
        if self._cp is not None:
            await self._cp.close()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        self._started = False

    async def __aenter__(self) -> MeshNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- what the layers use --------------------------------------------------------------------------------
    @property
    def workload(self) -> Workload:
        if self._workload is None:
            raise RuntimeError("MeshNode.start() has not run")
        return self._workload

    @property
    def start_failure(self) -> BaseException | None:
        """Why start() failed part-way, if it did (the node then cannot start again: create a new one)."""
        return self._failed

    @property
    def stopped(self) -> bool:
        """stop() ran: the node left the mesh for good (it calls no more and cannot start again)."""
        return self._stopped

    @property
    def outbound(self) -> OutboundPipeline:
        if self._stopped:
            raise FailedPreconditionError(f"{self.kind} {self.name!r} has left the mesh (it was stopped): it "
                                          "makes no more calls")
        if self._failed is not None:
            raise FailedPreconditionError(f"{self.kind} {self.name!r} makes no calls: its start failed "
                                          f"({describe_failure(self._failed)})")
        if self._outbound is None:
            raise RuntimeError("MeshNode.start() has not run")
        return self._outbound

    @property
    def controlplane(self) -> ControlPlaneClient:
        if self._cp is None:
            raise RuntimeError("MeshNode.start() has not run")
        return self._cp

    def live_instances_of(self, capability: str) -> int:
        """How many live instances of this agent serve capability (a cluster-wide rate limit's divisor)."""
        return sum(1 for i in self.registry.offering(capability) if i.card.name == self.name) or 1

    @property
    def jwks_issued_at(self) -> float:
        """Unix time the key set in force was issued (0: none yet)."""
        return self._jwks_issued_at_ns / 1e9

    def verifier(self) -> TokenVerifier:
        """A verifier for tokens addressed to this workload, using the key set kept in sync from etcd."""
        return TokenVerifier(
            self.keyset, issuer=controlplane_id(self.settings.trust_domain), audience=self.workload.spiffe_id,
            revocations=self.revocations,
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that always present the current certificate (renewals apply to new handshakes)."""

        def current() -> KeyMaterial:
            w = self.workload
            return w.cert_pem, w.key_pem, w.bundle_pem

        return renewing_server_credentials(current, require_client_auth=True)

    # --- background ----------------------------------------------------------------------------------------
    def _on_trust_change(self) -> None:
        """Adopt a new key set only if a root this node trusts signed it, and never an older one than held:
        etcd write access alone must not let anyone add a token key (or roll back to a stale set)."""
        assert self._trust is not None
        raw = self._trust.snapshot().get(JWKS_KEY)
        if raw is None or self._workload is None:
            return  # keep the last keys: a deleted key set must not lock the mesh out (keys expire by rotation)
        try:
            signed = verify_jwks(raw, self._workload.bundle_pem)
            if signed.issued_at_ns < self._jwks_issued_at_ns:
                raise ValueError("it is older than the key set in use (a replay?)")
            self.keyset.update_from_jwks(signed.jwks_json)
        except ValueError as exc:
            self.jwks_rejections += 1
            self._jwks_refused = True
            log.error("ignoring the key set published in etcd, keeping the last good one: %s", exc)
            return
        self._jwks_issued_at_ns = signed.issued_at_ns
        self._jwks_refused = False
        self._keep_floor()

    def _on_bundle_change(self) -> None:
        """A new signed trust bundle (CA rotation step): trust it for new handshakes, and renew if asked."""
        assert self._bundle is not None
        raw = self._bundle.snapshot().get(TRUST_BUNDLE_KEY)
        if raw is None or self._workload is None:
            return
        try:
            doc = verify_trust_doc(raw, self._workload.bundle_pem)
        except ValueError as exc:
            self.bundle_rejections += 1
            log.error("ignoring a trust bundle published in etcd: %s", exc)
            return
        if doc.generation < self._bundle_generation:
            self.bundle_rejections += 1
            log.error("ignoring the trust bundle published in etcd, keeping generation %d: its generation %d is "
                      "older (a replay?)", self._bundle_generation, doc.generation)
            return
        if doc.generation == self._bundle_generation:
            return  # the one held, seen again
        self._bundle_generation = doc.generation
        self._keep_floor()
        if doc.bundle_pem != self._workload.bundle_pem:
            self._use_workload(dataclasses.replace(self._workload, bundle_pem=doc.bundle_pem), same_cert=True)
            log.info("now trusting the CA bundle of generation %d", doc.generation)
            if self._jwks_refused and self._trust is not None:
                self._on_trust_change()  # a key set signed by a root only this bundle trusts (watch order)
        if doc.renew:
            signer = next((c for c in load_certs(doc.bundle_pem) if fingerprint(c) == doc.signing_root), None)
            if signer is not None and not issued_by(self._workload.cert_pem, signer):
                self._renew_now.set()

    def _identity_store(self) -> IdentityStore | None:
        """The state folder's identity store, when this node keeps its identity there (not given cert files)."""
        s = self.settings
        if s.identity_dir is None or s.cert_file is not None:
            return None
        return IdentityStore(s.identity_dir, self.name, self.kind, s.trust_domain)

    def _keep_floor(self) -> None:
        store = self._identity_store()
        if store is not None:
            store.save_floor(TrustFloor(self._bundle_generation, self._jwks_issued_at_ns))

    def _use_workload(self, workload: Workload, *, same_cert: bool) -> None:
        self._workload = workload
        s = self.settings
        if s.identity_dir is not None and s.cert_file is None:
            self._save(IdentityStore(s.identity_dir, self.name, self.kind, s.trust_domain), workload)
        if self._channels is not None:
            self._channels.update_workload(workload)
        if same_cert and self._cp is not None:
            self._cp.update_workload(workload)
        if not same_cert and self._tokens is not None:
            self._tokens.clear()  # tokens are bound to the old certificate's thumbprint
        for listener in list(self.workload_listeners):
            try:
                listener(workload)
            except Exception:
                log.exception("could not take the new certificate or trust bundle into %r", listener)

    async def _renew_loop(self) -> None:
        """Renew the certificate at half its lifetime (±10% jitter), or at once when a CA rotation asks;
        retry with backoff while the CA is down."""
        while True:
            w = self.workload
            delay = renewal_delay(w.expires_at - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_now.wait(), timeout=max(delay, 1.0))
                # A rotation asked every node at once: spread the fleet's renewals over half a second.
                await asyncio.sleep(random.uniform(0.0, 0.5))
            self._renew_now.clear()
            told_expired = False
            for attempt in range(1_000_000):
                try:
                    renewed = await self.controlplane.renew()
                    break
                except HivemeshError as exc:
                    if time.time() >= w.expires_at:
                        log.error("certificate expired and renewal failed: %s", exc)
                        if not told_expired:
                            told_expired = True
                            await self._certificate_event("expired", w)
                    await asyncio.sleep(renewal_retry_delay(attempt, w.expires_at - time.time()))
            self.renewals += 1
            self._use_workload(renewed, same_cert=False)  # the control-plane client switched to it already
            log.info("renewed certificate for %s, valid until %s", renewed.spiffe_id, time.ctime(renewed.expires_at))
            await self._certificate_event("renewed", renewed)

    async def _certificate_event(self, event: str, workload: Workload) -> None:
        for hook in list(self.certificate_hooks):
            try:
                await hook(event, workload)
            except Exception:
                log.exception("certificate hook %r failed on %s", hook, event)
