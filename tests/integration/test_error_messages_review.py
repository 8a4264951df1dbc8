"""Error messages that say what happened and what to do, on the real mesh (real etcd, TLS, gRPC and processes).

- An agent process stopped in the middle of a call (SIGTERM: its server cancels the calls it still runs after its
  grace; SIGKILL: its connection just closes) used to fail the caller with gRPC's own text ("Cancelling all
  calls", "Stream removed (Socket closed)"). It now names the agent, instance and capability, says the call may
  have run and when sending it again is safe, with gRPC's text kept at the end; type, code and reason unchanged.
  On a link and on plain unary calls.
- An input one gRPC message cannot carry (over MAX_MESSAGE_BYTES) failed with "CLIENT: Sent message larger than
  max (N vs. M)"; the caller's side now refuses it before sending, naming capability, size, limit and what to do,
  and a link with another call open on it carries on.
- An agent port already taken ended in gRPC's "Failed to bind to address ...; set GRPC_VERBOSITY=debug".
- A grant refusal and a default-deny refusal name the operator's fix (`hivemesh allow ...`), and that very command,
  run by the real CLI, lets the call through.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from hivemesh.mesh.errors import (
    AgentUnavailableError,
    GrantDeniedError,
    HivemeshError,
    PayloadTooLargeError,
    PolicyDeniedError,
)
from hivemesh.mesh.outbound.link import LinkedInvoke
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.sdk import Agent, AgentServer, AgentServerConfig, MeshClient, capability
from hivemesh.sdk.serve import run
from tests.support.agents_for_tests import EchoAgent
from tests.support.links import settle_link
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, apply_policies_text, run_cli, start_mesh_env, stop_mesh_env
from tests.support.spawn import REPO, child_env, stop

pytestmark = pytest.mark.timeout(60)

STARTED = "handler started"


# --- an agent stopped mid-call ------------------------------------------------------------------------------------
class Sleeper(Agent):
    """Served in a child process by the real `run()`: says on stdout when it serves and when a call's handler
    began, so the test stops the process while the call runs, never by a guess of time."""

    name = "sleeper"
    version = "1.0.0"

    async def on_start(self) -> None:
        print("ready", flush=True)

    @capability(description="Say the handler started, then sleep for the seconds asked")
    async def slow(self, req: dict[str, float]) -> dict[str, float]:
        print(STARTED, flush=True)
        await asyncio.sleep(req.get("seconds", 30.0))
        return req

    @capability(description="Yield one item, say the handler started, then sleep for the seconds asked")
    async def slow_stream(self, req: dict[str, float]) -> AsyncIterator[dict[str, float]]:
        yield {"first": 1.0}
        print(STARTED, flush=True)
        await asyncio.sleep(req.get("seconds", 30.0))
        yield req


def sleeper_main() -> None:
    """The child process: `run(Sleeper())`, as an agent script runs (SIGTERM: deregister, drain, stop)."""
    run(Sleeper(), config=AgentServerConfig(instance_id="sleeper-1", lease_ttl_s=60))


async def _line(proc: asyncio.subprocess.Process, log: Path, timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    try:
        return (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().strip()
    except TimeoutError:
        tail = await asyncio.to_thread(log.read_text, errors="replace")
        raise AssertionError(f"no line from the agent within {timeout:.0f} s; log:\n{tail[-3000:]}") from None


@contextlib.asynccontextmanager
async def _sleeper(env: MeshEnv, tmp_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    log = tmp_path / "sleeper.log"
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from tests.integration.test_error_messages_review import sleeper_main; "
                                  "sleeper_main()",
            cwd=REPO, env=await child_env(env, "sleeper", tmp_path / "sleeper-home"), stdout=asyncio.subprocess.PIPE,
            stderr=err, start_new_session=True)
    try:
        assert await _line(proc, log) == "ready"
        yield proc
    finally:
        await stop(proc, kill=True)


@pytest.mark.parametrize(("sig", "link", "key"), [
    (signal.SIGTERM, True, ""),
    (signal.SIGKILL, True, "order-17"),
    (signal.SIGTERM, False, "order-17"),
    (signal.SIGKILL, False, ""),
], ids=["sigterm-link", "sigkill-link-keyed", "sigterm-unary-keyed", "sigkill-unary"])
async def test_an_agent_stopped_mid_call_is_named_and_the_caller_told_when_a_resend_is_safe(
    mesh_env: MeshEnv, tmp_path: Path, sig: signal.Signals, link: bool, key: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        proc = await stack.enter_async_context(_sleeper(mesh_env, tmp_path))
        client = await stack.enter_async_context(MeshClient.connect(
            name="caller", settings=await mesh_env.settings_for("caller", "client"), link=link))
        assert await client.node.registry.wait_for_capability("slow", 1, timeout=20)
        options: dict[str, Any] = {"idempotency_key": key} if key else {}
        call = asyncio.ensure_future(client.call("slow", {"seconds": 30}, timeout=15, **options))
        assert await _line(proc, tmp_path / "sleeper.log") == STARTED  # the handler runs the call now
        instance = client.instances("slow")[0]
        invoke = client.node.outbound.channels.get(instance.endpoint, instance.identity, instance.link_endpoint).invoke
        assert isinstance(invoke, LinkedInvoke) == link
        if link:  # the call went as a frame on the link, not unary
            assert isinstance(invoke, LinkedInvoke) and invoke._link is not None and invoke._link.sent_any
        proc.send_signal(sig)
        with pytest.raises(HivemeshError) as caught:
            await asyncio.wait_for(call, 15)
    err = caught.value
    # Type, code and reason as before: callers and retry policies match on them.
    assert type(err) is AgentUnavailableError, repr(err)
    assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "AGENT_UNAVAILABLE"), repr(err)
    assert isinstance(err.__cause__, grpc.aio.AioRpcError), repr(err.__cause__)
    message = err.message
    assert message.startswith("agent sleeper (instance sleeper-1) went away during the call to 'slow'"), message
    assert "the call may have run, in part or in full" in message, message
    if key:
        assert "safe to send again only with the same idempotency key, which this call carried" in message, message
    else:
        assert ("safe to send again only with an idempotency key (idempotency_key=), and this call carried none: "
                "sent again, it could run twice") in message, message
    # gRPC's own words stay, last, for whoever debugs it.
    said = err.__cause__.details() if isinstance(err.__cause__, grpc.aio.AioRpcError) else ""
    assert said and message.endswith(f"(gRPC: {said})"), (said, message)
    assert err.metadata["capability"] == "slow" and err.metadata["instance"] == "sleeper-1", err.metadata
    assert err.metadata["agent"] == f"spiffe://{TRUST_DOMAIN}/agent/sleeper", err.metadata


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_an_agent_stopped_mid_stream_is_named_with_the_chunks_it_sent_and_a_resend_is_not_safe(
    mesh_env: MeshEnv, tmp_path: Path, sig: signal.Signals
) -> None:
    """A stream cut by its agent going away: the same words, how many chunks came, and no idempotency key advice (a
    stream carries none)."""
    async with contextlib.AsyncExitStack() as stack:
        proc = await stack.enter_async_context(_sleeper(mesh_env, tmp_path))
        client = await stack.enter_async_context(MeshClient.connect(
            name="caller", settings=await mesh_env.settings_for("caller", "client")))
        assert await client.node.registry.wait_for_capability("slow-stream", 1, timeout=20)
        items: list[Any] = []
        first = asyncio.Event()

        async def read() -> None:
            async for item in client.stream("slow-stream", {"seconds": 30}, timeout=15):
                items.append(item)
                first.set()

        reading = asyncio.ensure_future(read())
        assert await _line(proc, tmp_path / "sleeper.log") == STARTED  # the first item is out, the handler sleeps
        await asyncio.wait_for(first.wait(), 15)  # and it reached the caller
        proc.send_signal(sig)
        with pytest.raises(HivemeshError) as caught:
            await asyncio.wait_for(reading, 15)
    err = caught.value
    assert items == [{"first": 1.0}], items
    assert type(err) is AgentUnavailableError, repr(err)
    assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "AGENT_UNAVAILABLE"), repr(err)
    assert isinstance(err.__cause__, grpc.aio.AioRpcError), repr(err.__cause__)
    message = err.message
    assert message.startswith("agent sleeper (instance sleeper-1) went away during the stream from 'slow-stream', "
                              "after 1 chunk (its process stopped or its connection broke before the stream ended)"
                              ), message
    assert "the call may have run, in part or in full; a stream is never deduplicated, so sent again it could run " \
           "twice (gRPC: " in message, message
    assert err.metadata["instance"] == "sleeper-1" and err.metadata["capability"] == "slow-stream", err.metadata


@pytest.mark.parametrize("key", ["", "order-18"], ids=["unkeyed", "keyed"])
async def test_an_agent_stopped_mid_call_on_is_named_and_the_caller_told_when_a_resend_is_safe(
    mesh_env: MeshEnv, tmp_path: Path, key: str
) -> None:
    """`call_on` (a call to one given instance, as a fan-out to every instance makes it) says the same."""
    async with contextlib.AsyncExitStack() as stack:
        proc = await stack.enter_async_context(_sleeper(mesh_env, tmp_path))
        client = await stack.enter_async_context(MeshClient.connect(
            name="caller", settings=await mesh_env.settings_for("caller", "client")))
        assert await client.node.registry.wait_for_capability("slow", 1, timeout=20)
        instance = client.instances("slow")[0]
        options: dict[str, Any] = {"idempotency_key": key} if key else {}
        call = asyncio.ensure_future(client.call_on(instance, "slow", {"seconds": 30}, timeout=15, **options))
        assert await _line(proc, tmp_path / "sleeper.log") == STARTED
        proc.send_signal(signal.SIGKILL)
        with pytest.raises(HivemeshError) as caught:
            await asyncio.wait_for(call, 15)
    err = caught.value
    assert type(err) is AgentUnavailableError, repr(err)
    assert isinstance(err.__cause__, grpc.aio.AioRpcError), repr(err.__cause__)
    message = err.message
    assert message.startswith("agent sleeper (instance sleeper-1) went away during the call to 'slow'"), message
    if key:
        assert "safe to send again only with the same idempotency key, which this call carried" in message, message
    else:
        assert "safe to send again only with an idempotency key (idempotency_key=), and this call carried none" \
               in message, message


# --- an input one message cannot carry ------------------------------------------------------------------------------
def _link_of(client: MeshClient) -> Any:
    """The open link of the client's channel to the only echo instance (None: none open)."""
    instance = client.instances("echo")[0]
    invoke = client.node.outbound.channels.get(instance.endpoint, instance.identity, instance.link_endpoint).invoke
    assert isinstance(invoke, LinkedInvoke)
    return invoke._link


@pytest.mark.parametrize("link", [True, False], ids=["link", "unary"])
async def test_an_input_one_message_cannot_carry_is_refused_before_sending_and_a_link_carries_on(
    mesh_env: MeshEnv, link: bool
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        agent = EchoAgent()
        await stack.enter_async_context(AgentServer(agent, await mesh_env.settings_for("echo")))
        client = await stack.enter_async_context(MeshClient.connect(
            name="caller", settings=await mesh_env.settings_for("caller", "client"), link=link))
        assert await client.node.registry.wait_for_capability("echo", 1, timeout=20)
        assert (await client.call("echo", {"text": "first"}, timeout=5))["text"] == "first"
        if link:
            await settle_link(client, "echo", {"text": "settle"})  # onto the direct link it keeps
        opened = _link_of(client) if link else None
        assert not link or (opened is not None and not opened.broken), "the first call opened no link"
        # A call open on the link (or channel) while the oversized one is refused.
        slow = asyncio.ensure_future(client.call("slow", {"seconds": 0.5}, timeout=10))
        text = "x" * 9_000_000
        calls_before = agent.calls
        refusals = []
        with pytest.raises(PayloadTooLargeError) as unary:
            await client.call("echo", {"text": text}, timeout=5)
        refusals.append(unary.value)
        with pytest.raises(PayloadTooLargeError) as streamed:
            async for _ in client.stream("shout", {"text": text}, timeout=5):
                pytest.fail("an oversized stream call was answered")
        refusals.append(streamed.value)
        assert await asyncio.wait_for(slow, 10) == {"seconds": 0.5}  # the open call was answered
        assert (await client.call("echo", {"text": "after"}, timeout=5))["text"] == "after"
        assert agent.calls == calls_before + 1, "the oversized call reached the agent"
        if link:
            assert _link_of(client) is opened and not opened.broken, "the oversized call broke the link"
    for err, cap in zip(refusals, ("echo", "shout"), strict=True):
        assert "Sent message larger than max" not in err.message, err.message
        assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE"), repr(err)
        size = int(err.metadata["size_bytes"])
        assert size > 9_000_000 and err.metadata["limit_bytes"] == str(MAX_MESSAGE_BYTES), err.metadata
        assert err.message == (
            f"the call to capability {cap!r} is {size} bytes with its input, over the {MAX_MESSAGE_BYTES}-byte limit "
            "of one mesh message, so it was not sent: send less (split the input over several calls), or put the "
            "data where the agent can read it and send a reference to it (a URL, a file or object key)"), err.message


# --- an agent port already taken ------------------------------------------------------------------------------------
async def test_an_agent_port_in_use_is_named_with_what_to_do(mesh_env: MeshEnv) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = AgentServer(EchoAgent(), await mesh_env.settings_for("echo"),
                             AgentServerConfig(host="127.0.0.1", port=port))
        with pytest.raises(OSError) as caught:
            await server.start()
    err = caught.value
    assert err.errno == errno.EADDRINUSE, repr(err)
    assert err.strerror == (f"cannot listen on 127.0.0.1:{port}: port {port} is already in use by another process "
                            "(or another server in this one); choose another port (AgentServerConfig(port=...)), or "
                            "port=0 for any free one"), err.strerror
    assert "GRPC_VERBOSITY" not in str(err) and err.__cause__ is None and err.__suppress_context__
    # Nothing was left behind: the same agent serves on a free port afterwards.
    async with AgentServer(EchoAgent(), await mesh_env.settings_for("echo")) as again:
        assert again.port


# --- refusals that name the operator's fix --------------------------------------------------------------------------
class Extractor(Agent):
    name = "extractor"
    version = "1.0.0"

    @capability(description="Echo the text back (a stand-in for extraction)")
    async def extract(self, req: dict[str, Any]) -> dict[str, Any]:
        return req


OPERATORS_ONLY = {"grants": [{"name": "operators", "subjects": [f"spiffe://{TRUST_DOMAIN}/operator/*"],
                              "capabilities": ["*"]}]}
HINT = "; an operator allows it with `hivemesh allow client/reporter extract --agent agent/extractor`"
REPORTER = f"spiffe://{TRUST_DOMAIN}/client/reporter"
EXTRACTOR = f"spiffe://{TRUST_DOMAIN}/agent/extractor"


async def _answered_within(client: MeshClient, limit_s: float) -> dict[str, Any]:
    """The call's answer once the policies just written are in force on the agent (within about a second)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            answer: dict[str, Any] = await client.call("extract", {"text": "hi"}, timeout=5)
            return answer
        except (GrantDeniedError, PolicyDeniedError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.05)


async def _hinted_command(env: MeshEnv, message: str) -> None:
    """Run the `hivemesh allow ...` a refusal names, with the real CLI as the operator."""
    command = message.rsplit("`hivemesh ", 1)[1].rstrip("`").split()
    code, out, err = await run_cli(env, *command)
    assert code == 0, (command, out, err)


async def test_a_grant_refusal_names_the_allow_command_that_fixes_it(
    etcd: Any, etcd_server: Any, tmp_path: Path
) -> None:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, OPERATORS_ONLY)  # no grant for clients
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(AgentServer(Extractor(), await env.settings_for("extractor")))
            client = await stack.enter_async_context(MeshClient.connect(
                name="reporter", settings=await env.settings_for("reporter", "client")))
            assert await client.node.registry.wait_for_capability("extract", 1, timeout=20)
            with pytest.raises(GrantDeniedError) as denied:
                await client.call("extract", {"text": "hi"}, timeout=5)
            assert denied.value.message == (
                f"no grant allows {REPORTER} any capability on {EXTRACTOR} (it offers: extract){HINT}")
            assert denied.value.reason == "GRANT_DENIED"
            await _hinted_command(env, denied.value.message)
            assert await _answered_within(client, 10) == {"text": "hi"}
    finally:
        await stop_mesh_env(env)


async def test_a_default_deny_names_the_allow_command_that_fixes_it(
    etcd: Any, etcd_server: Any, tmp_path: Path
) -> None:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, authz=None)  # clients granted all; no authz at all
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(AgentServer(Extractor(), await env.settings_for("extractor")))
            client = await stack.enter_async_context(MeshClient.connect(
                name="reporter", settings=await env.settings_for("reporter", "client")))
            assert await client.node.registry.wait_for_capability("extract", 1, timeout=20)
            what = f"{REPORTER} invoke extract on {EXTRACTOR}"
            with pytest.raises(PolicyDeniedError) as none:
                await client.call("extract", {"text": "hi"}, timeout=5)
            assert none.value.message == (
                f"no authz policy exists, so every call is denied (default deny): {what}{HINT}")
            # An authz policy that allows something else: no rule allows this call.
            await apply_policies_text(env.etcd, yaml.safe_dump({"kind": "authz", "name": "others", "spec": {
                "rules": [{"name": "operators", "action": "ALLOW",
                           "from": {"callers": [f"spiffe://{TRUST_DOMAIN}/operator/*"]}}]}}))
            expected = f"no authz rule allows {what} (default deny){HINT}"
            deadline = time.monotonic() + 10
            while True:
                with pytest.raises(PolicyDeniedError) as denied:
                    await client.call("extract", {"text": "hi"}, timeout=5)
                if denied.value.message == expected or time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.05)
            assert denied.value.message == expected
            await _hinted_command(env, expected)
            assert await _answered_within(client, 10) == {"text": "hi"}
    finally:
        await stop_mesh_env(env)
