"""Waiting for a caller's link to a peer to be the one it keeps.

A caller's first calls to a peer that advertises a direct link go over Agent/Link on gRPC while the direct link
connects in the background (`mesh/outbound/link.py`, `LinkedInvoke`); tests that watch one link, or the tasks a
call leaves, first let the caller move to it."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from hivemesh.mesh.link_conn import GO
from hivemesh.mesh.outbound.link import LinkedInvoke
from hivemesh.sdk import MeshClient


def linked_invoke(client: MeshClient, capability: str) -> LinkedInvoke | None:
    """The client's LinkedInvoke to capability's one instance (None: it calls unary)."""
    (instance,) = client.node.registry.instances(capability)
    invoke = client.node.outbound.channels.get(instance.endpoint, instance.identity, instance.link_endpoint).invoke
    return invoke if isinstance(invoke, LinkedInvoke) else None


async def settle_link(client: MeshClient, capability: str, payload: Any, *, bound: int = 100,
                      timeout_s: float = 20.0) -> LinkedInvoke | None:
    """Call capability with payload (each answered, or it raises) until the client's link to its one instance is the
    one it keeps: a direct link where the instance advertises one, else the first link; at most bound calls and
    timeout_s. The link it moved away from has ended by then. Returns the LinkedInvoke (None: unary calls)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    (instance,) = client.node.registry.instances(capability)
    for _ in range(bound):
        await client.call(capability, payload, timeout=10)
        invoke = linked_invoke(client, capability)
        if invoke is None:
            return None
        link = invoke._link
        if link is not None and not link.broken and (link.direct or not instance.link_endpoint):
            retired = [t for t in asyncio.all_tasks() if "_Link._" in repr(t)]
            if len(retired) <= 2:  # the kept link's writer and reader only: the retired one has ended
                return invoke
        if loop.time() > deadline:
            break
        await asyncio.sleep(0.02)
    invoke = linked_invoke(client, capability)
    state = None if invoke is None else (invoke._link and invoke._link.direct, invoke._direct_after,
                                         invoke._opening and invoke._opening.failure)
    raise AssertionError(f"the caller's link to {capability!r} did not settle (direct, retry after, failure: {state})")


async def raw_direct_tls(host: str, port: int, context: ssl.SSLContext, server_hostname: str | None, *,
                         timeout_s: float = 10.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to a direct-link port made with asyncio's streams, not hivemesh's own connection: a peer
    that speaks the wire (docs/any-language.md) as it likes, for tests that send what hivemesh's client never would.
    TCP, the server's GO byte, then the handshake; raises what they raise."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    try:
        first = await asyncio.wait_for(reader.readexactly(1), timeout_s)
        if first != GO:
            raise AssertionError(f"the direct port's first byte is {first!r}, not GO")
        await writer.start_tls(context, server_hostname=server_hostname, ssl_handshake_timeout=timeout_s)
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer
