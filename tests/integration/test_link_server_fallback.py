"""`LinkServer._run`'s fallbacks for a call whose behaviour fails in a way no layer under it answered: a SystemExit
(or any other exception) it raised, or a CancelledError from a task it awaited (not a cancel of the call). The
SDK servicer answers those itself, so only a behaviour of its own reaches them (a sidecar's forwarder, a plain
agent's Invoke). Each call must be answered UNKNOWN at once, not left waiting for its deadline (nor, for a
SystemExit, stop the server's loop), and the link must serve the next call. Mutual TLS on loopback, called with
the SDK's own link client (`LinkedInvoke`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.ca import load_ca
from hivemesh.mesh.link_server import LinkServer, link_handler
from hivemesh.mesh.outbound.link import LinkedInvoke
from hivemesh.mesh.tls import channel_credentials, secure_channel, server_credentials
from tests.conftest import SessionCa
from tests.support.meshenv import TRUST_DOMAIN

pytestmark = pytest.mark.timeout(60)

INVOKE = "/hivemesh.v1.Agent/Invoke"
SERVER_NAME = f"fallback.agent.{TRUST_DOMAIN}"
TIMEOUT_S = 20.0
"""Each call's deadline: an answer only at the deadline shows as a call that took about this long."""
PROMPT_S = 5.0


class Behaviour:
    """The Invoke a LinkServer serves (bytes in, bytes out): fails as its request says, else echoes it; counts
    unary calls, which must stay 0 (every call here goes on the link)."""

    def __init__(self) -> None:
        self.unary = 0

    async def __call__(self, request: bytes, context: Any) -> bytes:
        if request == b"exit":
            raise SystemExit(3)
        if request == b"error":
            raise RuntimeError("the behaviour's own bug")
        if request == b"inner-cancelled":
            sub = asyncio.ensure_future(asyncio.sleep(30))
            asyncio.get_running_loop().call_later(0.05, sub.cancel)
            await sub  # CancelledError from the sub-task: not a cancel of this call
        return request

    async def unary_invoke(self, request: bytes, context: Any) -> bytes:
        self.unary += 1
        return await self(request, context)


@contextlib.asynccontextmanager
async def _served(session_ca: SessionCa, links: LinkServer, behaviour: Behaviour) -> AsyncIterator[LinkedInvoke]:
    """links served on a mutual-TLS loopback port, and the SDK's link client to it (closed after)."""
    ca = load_ca(session_ca.files.certs_dir)
    bundle = ca.bundle_pem()
    cert, key = ca.issue_with_new_key(f"spiffe://{TRUST_DOMAIN}/agent/fallback", common_name="fallback",
                                      dns_names=[SERVER_NAME], ttl_s=600)
    client_cert, client_key = ca.issue_with_new_key(f"spiffe://{TRUST_DOMAIN}/client/caller", common_name="caller",
                                                    dns_names=[], ttl_s=600)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("hivemesh.v1.Agent", {
        "Invoke": grpc.unary_unary_rpc_method_handler(behaviour.unary_invoke), "Link": link_handler(links)})])
    port = server.add_secure_port("127.0.0.1:0", server_credentials(cert, key, bundle))
    await server.start()
    try:
        creds = channel_credentials(bundle, client_cert, client_key)
        async with secure_channel(f"127.0.0.1:{port}", creds, server_name=SERVER_NAME) as channel:
            linked = LinkedInvoke(channel, channel.unary_unary(INVOKE))
            try:
                yield linked
            finally:
                linked.close()
    finally:
        await server.stop(None)


@pytest.mark.parametrize("request_", [b"exit", b"inner-cancelled", b"error"])
async def test_a_behaviour_that_fails_under_the_link_is_answered_unknown_at_once_and_the_link_serves_on(
    session_ca: SessionCa, request_: bytes
) -> None:
    behaviour = Behaviour()
    links = LinkServer(None, grpc.unary_unary_rpc_method_handler(behaviour))
    async with _served(session_ca, links, behaviour) as linked:
        assert await linked(b"first", timeout=TIMEOUT_S) == b"first"  # proves the link: later calls share it
        link = linked._link
        for n in range(2):  # the link answers the next one the same way too
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await linked(request_, timeout=TIMEOUT_S)
            took = time.monotonic() - started
            assert failed.value.code() is grpc.StatusCode.UNKNOWN, failed.value
            assert failed.value.details() == "unexpected error serving the call"
            assert took < PROMPT_S, f"answered only after {took:.1f} s (its deadline is {TIMEOUT_S} s)"
            assert await linked(b"next %d" % n, timeout=TIMEOUT_S) == b"next %d" % n
        assert linked._link is link and link is not None and not link.broken, "the link did not serve on"
        assert links.links == 1 and links.calls == 5 and behaviour.unary == 0, (links.links, links.calls)
