"""What a caller in any language hears through a sidecar's `Mesh` service when its own deadline passes, and when the
agent behind the callee's sidecar dies (a real process, exiting under the call) or is not there at all.

A local caller's deadline goes on less a margin (`sidecar._onward_timeout`), so the mesh's DEADLINE_EXCEEDED (its
message and ErrorInfo) reaches the caller before the caller's own timer ends the call with gRPC's bare one. The
callee's sidecar tells a refused connection to its agent (nothing ran, safe to send again) from one that broke
under the call (it may have run), naming the agent and instance, not only its loopback address."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from hivemesh.mesh import sidecar as sidecar_mod
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.v1 import agent_pb2, mesh_pb2, mesh_pb2_grpc
from tests.support.dying_agent import DyingAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.spawn import REPO, stop

PLAIN = f"spiffe://{TRUST_DOMAIN}/agent/plain"


def _info(trailers: Iterable[tuple[str, str | bytes]] | None) -> error_details_pb2.ErrorInfo | None:
    """The hivemesh ErrorInfo in a status's trailers."""
    for key, value in trailers or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


@dataclass
class Rig:
    agent_sidecar: Sidecar
    caller: mesh_pb2_grpc.MeshStub
    channel: grpc.aio.Channel


@contextlib.asynccontextmanager
async def _rig(
    mesh_env: MeshEnv, tmp: Path, agent: str, *capabilities: str, **config: object
) -> AsyncIterator[Rig]:
    """A sidecar in front of the agent at `agent` (agent 'plain') and a caller-only sidecar (client 'tester'), as a
    program in another language runs it; the caller's Mesh stub, once the caller's registry sees capabilities."""
    fronting = Sidecar(SidecarConfig(agent=agent, **config),  # type: ignore[arg-type]
                       await mesh_env.settings_for("plain"))
    caller = Sidecar(SidecarConfig(client="tester", mesh_socket=str(tmp / "caller.sock")),
                     await mesh_env.settings_for("tester", "client"))
    async with fronting, caller:
        assert caller.node is not None
        for capability in capabilities:
            assert await caller.node.registry.wait_for_capability(capability, 1, timeout=10)
        async with grpc.aio.insecure_channel(caller.mesh_endpoint) as channel:
            yield Rig(fronting, mesh_pb2_grpc.MeshStub(channel), channel)


def _request(capability: str, value: object) -> agent_pb2.InvokeRequest:
    return agent_pb2.InvokeRequest(capability=capability, input=json.dumps(value).encode())


# --- the caller's deadline: the mesh's DEADLINE_EXCEEDED arrives first -----------------------------------------------
DEADLINE_S = 5.0


@pytest.fixture
def wide_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 s margin on the 5 s deadline instead of the shipped 250 ms (whose sizes `tests/unit/test_onward_timeout.py`
    pins). What these tests show is the mechanism: the sidecar ends the call first and its error, naming the agent,
    gets back. With 250 ms, on four test workers beside a busy loop on each core, the caller's own timer once
    fired first: on a host that loaded, the mesh's answer arriving first is best effort."""
    monkeypatch.setattr(sidecar_mod, "_MARGIN_SHARE", 0.2)
    monkeypatch.setattr(sidecar_mod, "_MARGIN_MAX_S", 1.0)


def _assert_the_meshs_deadline(exc: grpc.aio.AioRpcError, rig: Rig, capability: str, started: float) -> None:
    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = _info(exc.trailing_metadata())
    assert info is not None, f"the caller's own timer ended the call first: {exc.details()!r}"
    assert info.reason == "DEADLINE_EXCEEDED"
    assert (info.metadata["capability"], info.metadata["agent"], info.metadata["instance"]) == (
        capability, PLAIN, rig.agent_sidecar.instance_id)
    assert f"agent plain (instance {rig.agent_sidecar.instance_id})" in exc.details()
    assert time.monotonic() - started < DEADLINE_S + 1, "ended by the deadline, not by the agent's work"


async def test_a_local_callers_deadline_ends_its_call_with_the_meshs_deadline_exceeded(
    mesh_env: MeshEnv, tmp_path: Path, wide_margin: None
) -> None:
    """Mesh.Call, Mesh.Link and Mesh.CallBatch with a caller's deadline shorter than the agent's work: the mesh's
    error, naming the agent, comes back before the caller's own timer fires."""
    async with DyingAgent("plain") as agent, _rig(mesh_env, tmp_path, agent.endpoint, "slow") as rig:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rig.caller.Call(_request("slow", {"seconds": 30}), timeout=DEADLINE_S)
        _assert_the_meshs_deadline(info.value, rig, "slow", started)
        assert "did not answer 'slow'" in info.value.details()

        # A Link frame's timeout_s is its deadline: its answer is the same rich status.
        link = rig.channel.stream_stream(
            "/hivemesh.v1.Mesh/Link", request_serializer=agent_pb2.LinkFrame.SerializeToString,
            response_deserializer=agent_pb2.LinkFrame.FromString)
        frame = agent_pb2.LinkFrame(id=1, call=agent_pb2.LinkCall(
            request=_request("slow", {"seconds": 30}).SerializeToString(), timeout_s=DEADLINE_S))
        async with asyncio.timeout(10):
            [answer] = [m.answer async for m in link(iter([frame]))]
        assert answer.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        linked = _info((h.key, h.value) for h in answer.binary_trailers)
        assert linked is not None, f"the link's own timer answered first: {answer.message!r}"
        assert (linked.reason, linked.metadata["agent"]) == ("DEADLINE_EXCEEDED", PLAIN)

        # A batch answers in one message: its item's deadline error is in it, not the caller's bare deadline.
        batch = await rig.caller.CallBatch(
            mesh_pb2.CallBatchRequest(items=[_request("slow", {"seconds": 30})]), timeout=DEADLINE_S)
        [result] = batch.results
        assert (result.error.code, result.error.reason) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")
        assert "did not answer 'slow'" in result.error.message


async def test_a_local_callers_deadline_ends_its_stream_with_the_meshs_deadline_exceeded(
    mesh_env: MeshEnv, tmp_path: Path, wide_margin: None
) -> None:
    async with DyingAgent("plain") as agent, _rig(mesh_env, tmp_path, agent.endpoint, "drip") as rig:
        started = time.monotonic()
        chunks = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for chunk in rig.caller.CallStream(_request("drip", {}), timeout=DEADLINE_S):
                chunks.append(json.loads(chunk.data))
        assert chunks == ["one", "two"]
        _assert_the_meshs_deadline(info.value, rig, "drip", started)
        assert "did not finish the stream of 'drip' (after 2 chunks)" in info.value.details()


async def test_a_call_without_a_deadline_goes_on_without_one(mesh_env: MeshEnv, tmp_path: Path) -> None:
    """No caller deadline, no margin: the agent sees no deadline at all (no timeouts policy here)."""
    async with DyingAgent("plain") as agent, _rig(mesh_env, tmp_path, agent.endpoint, "slow") as rig:
        await rig.caller.Call(_request("slow", {"seconds": 0}))
        assert agent.deadlines[-1] is None


# --- the agent behind the callee's sidecar dies, or is not there ------------------------------------------------------
async def _dying_agent(log: Path, *args: str) -> tuple[asyncio.subprocess.Process, str]:
    """`python -m tests.support.dying_agent` as a process of its own: (process, endpoint) once it serves."""
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.dying_agent", *args, cwd=REPO, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=err, start_new_session=True)
    assert proc.stdout is not None
    try:
        port = int(await asyncio.wait_for(proc.stdout.readline(), 30))
    except BaseException:
        await stop(proc, kill=True)
        raise
    return proc, f"127.0.0.1:{port}"


def _assert_agent_unavailable(exc: grpc.aio.AioRpcError, rig: Rig, capability: str, may_have_run: str) -> None:
    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
    info = _info(exc.trailing_metadata())
    assert info is not None and info.reason == "AGENT_UNAVAILABLE", exc.details()
    assert dict(info.metadata) == {"capability": capability, "agent": PLAIN,
                                   "instance": rig.agent_sidecar.instance_id, "may_have_run": may_have_run}
    assert f"agent plain (instance {rig.agent_sidecar.instance_id})" in exc.details()


@pytest.mark.parametrize("link", [False, True], ids=["unary", "link"])
async def test_an_agent_that_dies_under_a_call_says_the_call_may_have_run(
    mesh_env: MeshEnv, tmp_path: Path, link: bool
) -> None:
    proc, endpoint = await _dying_agent(tmp_path / "agent.log", *(["--link"] if link else []))
    try:
        async with _rig(mesh_env, tmp_path, endpoint, "crash") as rig:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rig.caller.Call(_request("crash", {}), timeout=30)
            assert await asyncio.wait_for(proc.wait(), 10) == 3, "the call reached the agent, which died under it"
            _assert_agent_unavailable(info.value, rig, "crash", "true")
            details = info.value.details()
            assert "went away during the call to 'crash'" in details and "may have run" in details
            assert "safe to send again only with an idempotency key" in details
    finally:
        await stop(proc, kill=True)


async def test_an_agent_that_dies_mid_stream_says_the_stream_may_have_run(mesh_env: MeshEnv, tmp_path: Path) -> None:
    proc, endpoint = await _dying_agent(tmp_path / "agent.log")
    try:
        async with _rig(mesh_env, tmp_path, endpoint, "drip") as rig:
            stream = rig.caller.CallStream(_request("drip", {}), timeout=30)
            chunks = [json.loads((await stream.read()).data) for _ in range(2)]
            assert chunks == ["one", "two"]
            assert proc.stdin is not None
            proc.stdin.write(b"die\n")  # the agent exits at once, the stream still open
            await proc.stdin.drain()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stream.read()
            assert await asyncio.wait_for(proc.wait(), 10) == 3
            _assert_agent_unavailable(info.value, rig, "drip", "true")
            details = info.value.details()
            assert "went away during the stream from 'drip', after 2 chunks" in details
            assert "a stream is never deduplicated" in details
    finally:
        await stop(proc, kill=True)


async def test_an_agent_its_sidecar_cannot_connect_to_says_nothing_ran(mesh_env: MeshEnv, tmp_path: Path) -> None:
    """The agent stopped (its port closed) while its sidecar still serves: the connection is refused, so the call
    reached no agent, and the caller is told it is safe to send again."""
    proc, endpoint = await _dying_agent(tmp_path / "agent.log")
    try:
        # The health checks would soon take the instance out of service; this is the call that comes first.
        async with _rig(mesh_env, tmp_path, endpoint, "slow", health_interval_s=3600) as rig:
            assert proc.stdin is not None
            proc.stdin.close()  # a clean stop: the port closes
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rig.caller.Call(_request("slow", {"seconds": 0}), timeout=30)
            _assert_agent_unavailable(info.value, rig, "slow", "false")
            details = info.value.details()
            assert "cannot be reached by its sidecar" in details and "nothing ran" in details
            assert "sending it again is safe" in details
    finally:
        await stop(proc, kill=True)


async def test_a_stream_a_sidecar_could_not_start_goes_on_to_another_instance(
    mesh_env: MeshEnv, tmp_path: Path
) -> None:
    """A stream refused by a sidecar whose agent is not there ran nothing (AGENT_UNAVAILABLE, `may_have_run`
    "false"): the caller's node sends it to another instance, as it does a unary call, and marks that instance
    suspect, instead of failing the caller with a refusal it could have avoided."""
    async with DyingAgent("plain") as live, DyingAgent("plain") as gone:
        serving = Sidecar(SidecarConfig(agent=live.endpoint, health_interval_s=3600,
                                        mesh_socket=str(tmp_path / "serving.sock")),
                          await mesh_env.settings_for("plain"))
        fronting = Sidecar(SidecarConfig(agent=gone.endpoint, health_interval_s=3600,
                                         mesh_socket=str(tmp_path / "fronting.sock")),
                           await mesh_env.settings_for("plain"))
        caller = Sidecar(SidecarConfig(client="tester", mesh_socket=str(tmp_path / "caller.sock")),
                         await mesh_env.settings_for("tester", "client"))
        async with serving, fronting, caller:
            assert caller.node is not None
            assert await caller.node.registry.wait_for_capability("shout", 2, timeout=10)
            await gone.stop()  # its port closes; its sidecar still serves and stays registered
            dead = f"plain/{fronting.instance_id}"
            async with grpc.aio.insecure_channel(caller.mesh_endpoint) as channel:
                stub = mesh_pb2_grpc.MeshStub(channel)
                for _ in range(50):  # until balancing has tried the instance whose agent is gone (bounded)
                    chunks = [json.loads(c.data) async for c in stub.CallStream(_request("shout", {"text": "a b"}),
                                                                                 timeout=30) if c.data]
                    assert chunks == ["A", "B"]
                    if caller.node.liveness.is_suspect(dead):
                        break
                else:
                    pytest.fail(f"50 streams and none was sent to {dead}")
