"""A process's membership in the mesh: its identity, its view of the registry and trust, and its outbound path.

Every mesh participant (an SDK agent, a MeshClient, a sidecar) holds one MeshNode. It owns the long-lived,
shared state the layers read on the call path (registry index, key set, channels, tokens), so that state is
built once per process and kept fresh in the background, never fetched per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import grpc

from hivemesh.controlplane.client import ControlPlaneClient
from hivemesh.mesh.channels import ChannelPool
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.outbound import OutboundPipeline
from hivemesh.mesh.pki import controlplane_id
from hivemesh.mesh.registry import RegistryView
from hivemesh.mesh.routing import RoundRobinRouter
from hivemesh.mesh.settings import MeshSettings
from hivemesh.mesh.tls import Workload, join, load_workload_files
from hivemesh.mesh.token_source import TokenSource
from hivemesh.mesh.tokens import KeySet, TokenVerifier
from hivemesh.mesh.watch import PrefixCache

log = logging.getLogger(__name__)

JWKS_KEY = "/hivemesh/trust/jwks"
_RENEW_AT = 0.5  # of the certificate's lifetime, ±10% jitter so a fleet does not renew at once


class MeshNode:
    """Identity + registry view + key set + outbound pipeline for one process.

    Args:
        settings: where the mesh is.
        name: workload name (agent name, client name).
        kind: "agent", "client" or "operator" (the SPIFFE id's kind).
        verify_inbound: keep the token key set in sync (needed by anything that serves calls).
    """

    def __init__(self, settings: MeshSettings, *, name: str, kind: str = "client", verify_inbound: bool = False):
        self.settings = settings
        self.name = name
        self.kind = kind
        self._verify_inbound = verify_inbound
        self._workload: Workload | None = None
        self.registry = RegistryView(settings.etcd)
        self.keyset = KeySet()
        self._trust: PrefixCache[bytes] | None = None
        self._cp: ControlPlaneClient | None = None
        self._tokens: TokenSource | None = None
        self._channels: ChannelPool | None = None
        self.router = RoundRobinRouter(self.registry)
        self._outbound: OutboundPipeline | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._started = False

    # --- lifecycle ----------------------------------------------------------------------------------------
    async def start(self, *, timeout: float = 15.0) -> None:
        """Obtain an identity (existing files or a one-time join), then load the registry and trust state."""
        if self._started:
            return
        s = self.settings
        if s.cert_file is not None and s.key_file is not None:
            self._workload = load_workload_files(s.cert_file, s.key_file, s.ca_bundle)
        else:
            if not s.join_token:
                raise HivemeshError(
                    f"{self.kind} {self.name!r} has no identity: give a join token (HIVEMESH_JOIN_TOKEN) "
                    "or a certificate and key (HIVEMESH_CERT, HIVEMESH_KEY)"
                )
            self._workload = await join(
                s.join, s.ca_bundle.read_bytes(), s.join_token, self.name, self.kind, trust_domain=s.trust_domain
            )
        self._cp = ControlPlaneClient(s.controlplane, self._workload, s.trust_domain)
        self._tokens = TokenSource(self._cp)
        self._channels = ChannelPool(self._workload)
        self._outbound = OutboundPipeline(self.router, self._tokens, self._channels)
        try:
            await self.registry.start(timeout=timeout)
            if self._verify_inbound:
                self._trust = PrefixCache(s.etcd, JWKS_KEY, on_change=self._on_trust_change)
                await self._trust.start(timeout=timeout)
                if not await self._trust.wait_for(lambda snap: JWKS_KEY in snap, timeout):
                    raise HivemeshError("no token keys published in etcd: is the control plane running?")
        except BaseException:
            await self.stop()
            raise
        self._renew_task = asyncio.get_running_loop().create_task(self._renew_loop())
        self._started = True

    async def stop(self) -> None:
        """Release everything; idempotent."""
        if self._renew_task is not None:
            self._renew_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renew_task
            self._renew_task = None
        if self._trust is not None:
            await self._trust.stop()
        await self.registry.stop()
        if self._tokens is not None:
            await self._tokens.close()
        if self._channels is not None:
            await self._channels.close()
        if self._cp is not None:
            await self._cp.close()
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
    def outbound(self) -> OutboundPipeline:
        if self._outbound is None:
            raise RuntimeError("MeshNode.start() has not run")
        return self._outbound

    @property
    def controlplane(self) -> ControlPlaneClient:
        if self._cp is None:
            raise RuntimeError("MeshNode.start() has not run")
        return self._cp

    def verifier(self) -> TokenVerifier:
        """A verifier for tokens addressed to this workload, using the key set kept in sync from etcd."""
        return TokenVerifier(
            self.keyset, issuer=controlplane_id(self.settings.trust_domain), audience=self.workload.spiffe_id
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Server credentials that always present the current certificate (renewals apply to new handshakes)."""

        def fetch() -> Any:
            w = self.workload
            return grpc.ssl_server_certificate_configuration([(w.key_pem, w.cert_pem)], w.bundle_pem)

        return grpc.dynamic_ssl_server_credentials(fetch(), fetch, require_client_authentication=True)

    # --- background ----------------------------------------------------------------------------------------
    def _on_trust_change(self) -> None:
        assert self._trust is not None
        jwks = self._trust.snapshot().get(JWKS_KEY)
        if jwks is None:
            return  # keep the last keys: a deleted key set must not lock the mesh out (keys expire by rotation)
        try:
            self.keyset.update_from_jwks(jwks.decode())
        except ValueError as exc:
            log.error("ignoring an invalid key set published in etcd: %s", exc)

    async def _renew_loop(self) -> None:
        """Renew the certificate at half its lifetime (±10% jitter); retry with backoff while the CA is down."""
        while True:
            w = self.workload
            lifetime = max(w.expires_at - time.time(), 0.0)
            # NOTE: measured from now, not issuance: a restarted process renews at half of what is left.
            delay = lifetime * _RENEW_AT * random.uniform(0.9, 1.1)
            await asyncio.sleep(max(delay, 1.0))
            for attempt in range(1_000_000):
                try:
                    renewed = await self.controlplane.renew()
                    break
                except HivemeshError as exc:
                    if time.time() >= w.expires_at:
                        log.error("certificate expired and renewal failed: %s", exc)
                    await asyncio.sleep(min(2.0 ** min(attempt, 5), 30.0))
            self._workload = renewed  # the control-plane client switched to it already
            if self._channels is not None:
                self._channels.update_workload(renewed)
            if self._tokens is not None:
                self._tokens.clear()  # tokens are bound to the old certificate's thumbprint
            log.info("renewed certificate for %s, valid until %s", renewed.spiffe_id, time.ctime(renewed.expires_at))
