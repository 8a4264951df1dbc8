"""Reused mutual-TLS channels to mesh endpoints, one per (endpoint, identity), with raw-bytes stubs.

Channels are expensive (a TLS handshake, HTTP/2 setup) and calls on an open one are cheap, so every caller
shares them. The stubs pass bytes straight through: a forwarder never re-encodes a payload it only forwards.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import grpc

from hivemesh.mesh.link_direct import client_context
from hivemesh.mesh.outbound.link import DirectOpener, LinkedInvoke
from hivemesh.mesh.pki import parse_spiffe_id
from hivemesh.mesh.tls import Workload, secure_channel

log = logging.getLogger(__name__)

INVOKE = "/hivemesh.v1.Agent/Invoke"
INVOKE_STREAM = "/hivemesh.v1.Agent/InvokeStream"
DESCRIBE = "/hivemesh.v1.Agent/Describe"
_CLOSE_GRACE_S = 30.0


@dataclass(slots=True)
class Endpoint:
    """An open channel to one mesh endpoint and its raw stubs."""

    channel: grpc.aio.Channel
    invoke: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] | LinkedInvoke
    """Unary Invoke: a unary RPC per call, or a frame on the peer's link (`ChannelPool(link=True)`)."""
    invoke_stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes]


async def _close(ep: Endpoint) -> None:
    """Close ep's link, then its channel: a link's writer task would otherwise outlive its channel."""
    if isinstance(ep.invoke, LinkedInvoke):
        ep.invoke.close()
    await ep.channel.close()


class ChannelPool:
    """Channels to mesh endpoints, authenticated with this workload's certificate.

    The server's identity is checked by gRPC's hostname verification against the DNS SAN the CA puts in every
    certificate (`<name>.<kind>.<trust-domain>`), derived from the SPIFFE id the registry lists for the
    endpoint: a process that holds another identity's endpoint cannot impersonate it.
    """

    def __init__(self, workload: Workload, *, link: bool = False) -> None:
        """link: send unary calls as frames on one multiplexed stream per endpoint (`hivemesh.mesh.outbound.link`),
        falling back to unary calls for a peer that does not serve it; to a peer that advertises a direct link
        (`mesh/link_direct.py`), on that."""
        self._workload = workload
        self.link = link
        self._creds = workload.channel_credentials()
        self._direct_context: ssl.SSLContext | None = None
        self._endpoints: dict[tuple[str, str, str], Endpoint] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self._retiring: list[Endpoint] = []
        """Endpoints waiting out their grace before they are closed (`close` closes them at once)."""

    @property
    def workload(self) -> Workload:
        return self._workload

    def get(self, address: str, identity: str, link_address: str = "") -> Endpoint:
        """The shared endpoint for address, expected to present identity (a SPIFFE id); link_address: the peer's
        direct link ("": none; an address that does not parse is not used)."""
        key = (address, identity, link_address)  # a peer restarted with another direct port is another endpoint
        ep = self._endpoints.get(key)
        if ep is None:
            # The same peer at another direct port (it restarted): the old endpoint finishes, then is closed.
            stale = [k for k in self._endpoints if k[:2] == key[:2]]
            if stale:
                self._retire([self._endpoints.pop(k) for k in stale])
            server_name = parse_spiffe_id(identity).dns_name
            channel = secure_channel(address, self._creds, server_name=server_name)
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(INVOKE)
            ep = Endpoint(
                channel=channel,
                invoke=LinkedInvoke(channel, unary, direct=self._direct(link_address, server_name))
                if self.link else unary,
                invoke_stream=channel.unary_stream(INVOKE_STREAM),
            )
            self._endpoints[key] = ep
        return ep

    def _direct(self, link_address: str, server_name: str) -> DirectOpener | None:
        if not link_address:
            return None
        if self._direct_context is None:  # one per certificate: a context holds its key and trust anchors
            self._direct_context = client_context(self._workload)
        try:
            return DirectOpener(link_address, server_name, self._direct_context)
        except ValueError:
            log.warning("ignoring a direct link address that is not host:port: %r", link_address[:100])
            return None

    def update_workload(self, workload: Workload) -> None:
        """Use a renewed certificate for new channels; close the old ones after in-flight calls had time to end."""
        self._workload = workload
        self._creds = workload.channel_credentials()
        self._direct_context = None
        old = list(self._endpoints.values())
        self._endpoints = {}
        if old:
            self._retire(old)

    def _retire(self, old: list[Endpoint]) -> None:
        """Close old after in-flight calls had time to end (at once if the pool closes first)."""
        self._retiring.extend(old)

        async def close_later() -> None:
            await asyncio.sleep(_CLOSE_GRACE_S)
            for ep in old:
                if ep in self._retiring:
                    self._retiring.remove(ep)
            await asyncio.gather(*(_close(ep) for ep in old), return_exceptions=True)

        task = asyncio.get_running_loop().create_task(close_later())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def forget(self, address: str) -> None:
        """Drop channels to address (the instance is gone)."""
        for key in [k for k in self._endpoints if k[0] == address]:
            ep = self._endpoints.pop(key)
            task = asyncio.get_running_loop().create_task(_close(ep))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
        endpoints, self._endpoints = [*self._endpoints.values(), *self._retiring], {}
        self._retiring = []
        results: list[Any] = await asyncio.gather(*(_close(ep) for ep in endpoints), return_exceptions=True)
        del results
