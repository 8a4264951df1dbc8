"""A typed asyncio client for the control plane's mTLS API (used by every node, the SDK and the CLI).

It lives in the data plane because nodes call the control plane (join, renewal, tokens, audit shipping); the
control plane only serves this API and never imports its client.

Every failed call raises the typed hivemesh error the server raised (`from_rpc_error`), so callers catch
`GrantDeniedError`, `PermissionDeniedError` and so on rather than inspecting status codes; a call no control plane
answered raises `ControlPlaneUnavailableError` naming the address (`rpc_failure`): every client of a control-plane
service (policies, audit, escalations, state) maps its failures with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from hivemesh.mesh.controlplane_endpoints import parse_addresses
from hivemesh.mesh.controlplane_errors import UNREACHABLE, rpc_failure
from hivemesh.mesh.errors import from_rpc_error
from hivemesh.mesh.pki import controlplane_dns_name, new_key_and_csr
from hivemesh.mesh.tls import Workload, load_workload_files, secure_channel
from hivemesh.v1 import audit_pb2, audit_pb2_grpc, control_pb2, control_pb2_grpc, mesh_pb2, trust_pb2, trust_pb2_grpc

log = logging.getLogger(__name__)

_AGAIN_MIN_S = 0.5
"""The least time left of a call worth asking a replica again whose etcd request failed."""
_AGAIN_PAUSE_S = 0.05
HEDGE_AFTER_S = 0.75
"""How long a replica may stay silent before an idempotent call also goes to the next one. Control calls answer
in milliseconds (tens under load); a replica silent this long is most likely cut off or frozen, and waiting out
its share of the timeout left the next replica too little time in the multi-host test (docs/multihost.md)."""
_HEDGE_MAX = 2
"""Replicas asked at once at most: one hedge per slow replica, so a slow control plane gets twice its load, not n×."""
_HEDGE_BURST = 3
_HEDGE_RATIO = 0.1
"""The hedge budget: a client hedges at most 3 calls plus one in ten of the idempotent calls it made. When every
replica is slow (overload, not a cut), hedging each call would double the load that made them slow; gRPC
throttles its own retries and hedges for the same reason (retryThrottling)."""


def _settle(task: asyncio.Task[Any]) -> None:
    """Retrieve the outcome of an attempt nobody waits for any more (asyncio would log it as unretrieved)."""
    if not task.cancelled():
        task.exception()


class ControlPlaneClient:
    """Calls ControlPlane at address as `workload`, verifying the server as `controlplane.<trust_domain>`.

    address may list several replicas ("h:p,h:p"). Calls go to the current one; the idempotent control calls
    (token issue, certificate renewal, JWKS, agent list) move on to the next replica when one answers
    UNAVAILABLE or DEADLINE_EXCEEDED, or also ask it when one stays silent for `hedge_after_s`, and the replica
    that answered stays current. Any other call that finds its replica unreachable fails as before, and the next
    call goes to the next replica.
    """

    def __init__(
        self, address: str, workload: Workload, trust_domain: str | None = None, *, timeout_s: float = 10.0
    ) -> None:
        self.configured = parse_addresses(address)
        self.addresses: list[str] = list(self.configured)
        self._current = 0
        self.workload = workload
        self.trust_domain = trust_domain or workload.trust_domain
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self.failovers = 0
        """How many times a call moved on to another replica."""
        self.hedges = 0
        """How many times a slow replica's call also went to the next one (hedged)."""
        self.idempotent_calls = 0
        """Idempotent calls made: the hedge budget's base."""
        self.reachable: bool | None = None
        """Whether the last call got an answer (any status but UNAVAILABLE or DEADLINE_EXCEEDED); None: no call
        yet. The node's metrics export it."""

    @property
    def address(self) -> str:
        """The replica calls go to now."""
        return self.addresses[self._current]

    @property
    def attempt_timeout_s(self) -> float:
        """One replica's share of a call's time: a frozen replica must leave time to ask another."""
        n = len(self.addresses)
        return self.timeout_s if n == 1 else max(1.0, self.timeout_s / n)

    @property
    def hedge_after_s(self) -> float:
        """How long a replica may stay silent before an idempotent call also asks the next one."""
        return min(HEDGE_AFTER_S, self.attempt_timeout_s / 2)

    def learn(self, addresses: Sequence[str]) -> None:
        """Replicas found elsewhere (their adverts in etcd): the configured ones and these, current first kept."""
        current = self.address
        merged = list(dict.fromkeys([*self.configured, *addresses]))
        gone = [a for a in self.addresses if a not in merged and a != current]
        if current not in merged:
            merged.insert(0, current)
        self.addresses = merged
        self._current = merged.index(current)
        for addr in gone:
            channel = self._channels.pop(addr, None)
            if channel is not None:
                self._retire(channel)

    def _away_from(self, address: str) -> None:
        """Make the replica after address current, unless a concurrent call already moved on from it."""
        if self.address == address:
            self._current = (self._current + 1) % len(self.addresses)

    @classmethod
    def from_certs_dir(
        cls, address: str, certs_dir: Path | str, *, identity: str = "operator"
    ) -> ControlPlaneClient:
        """A client using `<identity>.pem/.key` and `ca.pem` from certs_dir (the layout `hivemesh certs init`
        writes: the operator's CLI setup)."""
        d = Path(certs_dir)
        workload = load_workload_files(d / f"{identity}.pem", d / f"{identity}.key", d / "ca.pem")
        return cls(address, workload)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The mutual-TLS channel to the current replica (replaced on renewal), for the feature services."""
        return self._channel_to(self.address)

    def _channel_to(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = secure_channel(
                address, self.workload.channel_credentials(), server_name=controlplane_dns_name(self.trust_domain)
            )
            self._channels[address] = channel
        return channel

    async def _call(self, name: str, request: Any) -> Any:
        """ControlPlane.<name> for an idempotent call, failing over to the next replica while one is unreachable,
        and hedging: a replica silent for `hedge_after_s` is left running while the next one is asked too, and
        the first answer wins (a partitioned replica sends no RST, so only its timeout would end the wait).

        A replica that answered REGISTRY_UNAVAILABLE is up but its etcd request failed (a member it asked was
        cut off: docs/multihost.md); once every replica was tried, those are asked once more within what is left
        of timeout_s, since the control plane's next etcd request goes elsewhere. No attempt outlives timeout_s."""
        start = self._current
        queue = [*self.addresses[start:], *self.addresses[:start]]  # this call's own order: others may move on
        self.idempotent_calls += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        answered: list[str] = []
        again = False
        running: dict[asyncio.Task[Any], str] = {}
        failed: grpc.aio.AioRpcError | None = None

        async def attempt(address: str, timeout: float) -> Any:
            stub = control_pb2_grpc.ControlPlaneStub(self._channel_to(address))
            return await getattr(stub, name)(request, timeout=timeout)

        def ask() -> None:
            """The next replica of the queue; the last one may use all the time left, the others their share
            (one that stays silent must leave time to ask the replica after it)."""
            address = queue.pop(0)
            left = deadline - loop.time()
            running[loop.create_task(attempt(address, min(self.attempt_timeout_s, left) if queue else left))] = address

        try:
            while True:
                if not running:
                    if not queue and answered and not again and deadline - loop.time() > _AGAIN_MIN_S:
                        again, queue = True, answered
                        await asyncio.sleep(_AGAIN_PAUSE_S)
                    if not queue or deadline - loop.time() <= 0:
                        assert failed is not None  # the loop only gets here after an attempt failed
                        self.reachable = failed.code() not in UNREACHABLE
                        raise rpc_failure(failed, ", ".join(self.addresses), timeout_s=self.timeout_s) from failed
                    ask()
                hedge = (bool(queue) and len(running) < _HEDGE_MAX and deadline - loop.time() > _AGAIN_MIN_S
                         and self.hedges < _HEDGE_BURST + _HEDGE_RATIO * self.idempotent_calls)
                done, _ = await asyncio.wait(
                    running, timeout=self.hedge_after_s if hedge else None, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:  # the replicas asked are slow: ask the next one too, keep waiting on them
                    self.hedges += 1
                    log.info("control plane %s silent for %.2f s on %s; also asking %s",
                             ", ".join(running.values()), self.hedge_after_s, name, queue[0])
                    ask()
                    continue
                for task in done:
                    address = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        self.reachable = True
                        if self.address != address and address in self.addresses:
                            self._current = self.addresses.index(address)  # the replica that answered stays current
                        return task.result()
                    if not isinstance(exc, grpc.aio.AioRpcError):
                        raise exc
                    failed = exc
                    registry = from_rpc_error(exc).reason == "REGISTRY_UNAVAILABLE"
                    if exc.code() not in UNREACHABLE:
                        self.reachable = True
                        raise from_rpc_error(exc) from exc  # an answer: the call failed, not the replica
                    self._away_from(address)
                    if registry and not again:
                        answered.append(address)
                    if queue or running or (answered and not again):
                        log.warning("control plane %s unreachable for %s (%s); %s", address, name, exc.code().name,
                                    "trying the next replica" if queue else "waiting on the replica also asked"
                                    if running else "asking it again")
                        self.failovers += 1
        finally:
            for task in running:  # a hedge lost the race, or the call was cancelled: end its RPC
                task.cancel()
                task.add_done_callback(_settle)

    async def issue_token(
        self, audience: str, scopes: Sequence[str] = (), ttl_s: int = 0
    ) -> control_pb2.IssueTokenResponse:
        """A capability token for audience (an agent SPIFFE id), bound to this client's certificate."""
        resp: control_pb2.IssueTokenResponse = await self._call(
            "IssueToken",
            control_pb2.IssueTokenRequest(audience=audience, scopes=list(scopes), ttl_seconds=ttl_s),
        )
        return resp

    async def create_join_token(
        self, name: str, kind: str = "agent", ttl_s: int = 0
    ) -> control_pb2.CreateJoinTokenResponse:
        """A one-time join token for a workload (operators only)."""
        resp: control_pb2.CreateJoinTokenResponse = await self.call(
            control_pb2_grpc.ControlPlaneStub(self.channel).CreateJoinToken,
            control_pb2.CreateJoinTokenRequest(name=name, kind=kind, ttl_seconds=ttl_s),
        )
        return resp

    async def list_agents(self) -> list[mesh_pb2.AgentInstance]:
        resp: control_pb2.ListAgentsResponse = await self._call("ListAgents", control_pb2.ListAgentsRequest())
        return list(resp.instances)

    async def get_jwks(self) -> str:
        resp: control_pb2.GetJwksResponse = await self._call("GetJwks", control_pb2.GetJwksRequest())
        return resp.jwks_json

    async def renew(self) -> Workload:
        """A fresh key and certificate for this client's own identity; the client switches to it."""
        key_pem, csr_pem = new_key_and_csr(self.workload.spiffe_id)
        resp: control_pb2.SignCertificateResponse = await self._call(
            "RenewCertificate", control_pb2.SignCertificateRequest(csr_pem=csr_pem)
        )
        bundle = resp.ca_bundle_pem or self.workload.bundle_pem
        workload = Workload.from_pems(resp.certificate_pem, key_pem, bundle)
        old, self._channels = list(self._channels.values()), {}
        self.workload = workload
        await asyncio.gather(*(ch.close(grace=1.0) for ch in old))
        return workload

    # --- audit (issue 4): what a node's shipper and the CLI use ---------------------------------------------
    async def audit_source_state(self, source: str) -> int:
        """The last seq the control plane holds of an audit spool's chain (where shipping resumes)."""
        stub = audit_pb2_grpc.AuditStub(self.channel)
        resp: audit_pb2.SourceStateResponse = await self.call(
            stub.SourceState, audit_pb2.SourceStateRequest(source=source)
        )
        return int(resp.last_seq)

    async def audit_append(self, source: str, records: Sequence[bytes]) -> int:
        """Ship the next records of a spool's chain; returns the last seq the control plane now holds."""
        stub = audit_pb2_grpc.AuditStub(self.channel)
        resp: audit_pb2.AppendBatchResponse = await self.call(
            stub.AppendBatch, audit_pb2.AppendBatchRequest(source=source, records=list(records))
        )
        return int(resp.last_seq)

    @property
    def audit(self) -> audit_pb2_grpc.AuditStub:
        """The Audit stub on the current channel (query, export, verify, checkpoints)."""
        return audit_pb2_grpc.AuditStub(self.channel)

    @property
    def trust(self) -> trust_pb2_grpc.TrustStub:
        """The Trust stub on the current channel (token exchange, revocation, key and CA rotation)."""
        return trust_pb2_grpc.TrustStub(self.channel)

    async def call(self, method: Any, request: Any, *, timeout_s: float | None = None) -> Any:
        """Call any unary method of a feature stub, raising the typed hivemesh error it failed with."""
        address, timeout = self.address, timeout_s or self.timeout_s
        try:
            answer = await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            self.reachable = exc.code() not in UNREACHABLE
            if not self.reachable:
                self._away_from(address)  # this call fails (a repeat may not be safe); the next asks another
            raise rpc_failure(exc, address, timeout_s=timeout) from exc
        self.reachable = True
        return answer

    async def exchange_token(
        self, subject_token: str, audience: str, scopes: Sequence[str] = (), delegable: Sequence[str] = (),
        ttl_s: int = 0,
    ) -> control_pb2.IssueTokenResponse:
        """A delegated token for audience, acting for the principal of subject_token (RFC 8693 exchange)."""
        resp: control_pb2.IssueTokenResponse = await self.call(
            self.trust.ExchangeToken,
            trust_pb2.ExchangeTokenRequest(
                subject_token=subject_token, audience=audience, scopes=list(scopes), delegable=list(delegable),
                ttl_seconds=ttl_s,
            ),
        )
        return resp

    def update_workload(self, workload: Workload) -> None:
        """Use workload (e.g. a new trust bundle during a CA rotation) for new calls; the old channels close
        once their calls had time to finish."""
        old, self._channels = list(self._channels.values()), {}
        self.workload = workload
        for channel in old:
            self._retire(channel)

    def _retire(self, channel: grpc.aio.Channel) -> None:
        async def close_later() -> None:
            await asyncio.sleep(10.0)
            await channel.close()

        task = asyncio.get_running_loop().create_task(close_later())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
        channels, self._channels = list(self._channels.values()), {}
        await asyncio.gather(*(ch.close() for ch in channels))

    async def __aenter__(self) -> ControlPlaneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
