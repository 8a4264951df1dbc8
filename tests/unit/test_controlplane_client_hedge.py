"""A control-plane replica that stays silent is hedged: after `hedge_after_s` the same idempotent call also goes to
the next replica and the first answer wins. A partitioned host sends no RST, so without the hedge a call waited out
the silent replica's whole share of its timeout (the multi-host test's leader-host cut: docs/multihost.md).

The replicas are real gRPC servers over mutual TLS on 127.0.0.1; the silent one is either a socket that never
accepts (a frozen or cut-off process: the kernel completes the TCP handshake, nothing answers the TLS one) or a
servicer that holds the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.ca import init_ca
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import ControlPlaneUnavailableError, PermissionDeniedError, abort
from hivemesh.v1 import control_pb2, control_pb2_grpc
from tests.support.controlplane_replica import serving_replica

AUDIENCE = "spiffe://hivemesh.local/agent/echo"


class _Replica(control_pb2_grpc.ControlPlaneServicer):
    """Answers IssueToken with a token naming `name` (after `delay_s`); holds the call instead when `hold`; denies
    when `deny`."""

    def __init__(self, name: str, *, hold: bool = False, deny: bool = False, delay_s: float = 0.0) -> None:
        self.name, self.hold, self.deny, self.delay_s = name, hold, deny, delay_s
        self.calls = 0
        self.cancelled = asyncio.Event()

    async def IssueToken(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.calls += 1
        if self.deny:
            await abort(context, PermissionDeniedError("no grant for this audience"))
        if self.hold:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # a replica that is slow, not gone
        return control_pb2.IssueTokenResponse(token=self.name, scopes=list(request.scopes))


@contextlib.contextmanager
def _frozen() -> Any:
    """An address whose TCP handshake completes (the listen backlog) but that never reads: a SIGSTOPped process."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def _client(certs: Path, addresses: str, timeout_s: float) -> ControlPlaneClient:
    cp = ControlPlaneClient.from_certs_dir(addresses, certs)
    cp.timeout_s = timeout_s
    return cp


@pytest.mark.timeout(60)
async def test_a_frozen_replica_is_hedged_and_the_next_one_answers(tmp_path: Path) -> None:
    init_ca(tmp_path, "hivemesh.local")
    live = _Replica("live")
    with _frozen() as frozen:
        async with serving_replica(tmp_path, live) as address:
            # 60 s over two replicas: the frozen one's share is 30 s, so only the hedge answers within 15 s.
            async with _client(tmp_path, f"{frozen},{address}", 60.0) as cp:
                assert cp.hedge_after_s < cp.attempt_timeout_s
                token = await asyncio.wait_for(cp.issue_token(AUDIENCE, ["echo"]), 15)
                assert token.token == "live" and live.calls == 1
                assert cp.hedges == 1 and cp.address == address and cp.reachable
                # The replica that answered stays current: the next call goes straight to it, no hedge.
                assert (await asyncio.wait_for(cp.issue_token(AUDIENCE, ["echo"]), 15)).token == "live"
                assert cp.hedges == 1 and live.calls == 2


@pytest.mark.timeout(60)
async def test_the_slow_replica_s_call_is_cancelled_once_the_hedge_answered(tmp_path: Path) -> None:
    init_ca(tmp_path, "hivemesh.local")
    slow, fast = _Replica("slow", hold=True), _Replica("fast")
    async with serving_replica(tmp_path, slow) as a1, serving_replica(tmp_path, fast) as a2:
        async with _client(tmp_path, f"{a1},{a2}", 60.0) as cp:
            assert (await asyncio.wait_for(cp.issue_token(AUDIENCE, ["echo"]), 15)).token == "fast"
            await asyncio.wait_for(slow.cancelled.wait(), 15)  # its RPC ended: no call left behind
            assert (slow.calls, fast.calls, cp.hedges) == (1, 1, 1)


@pytest.mark.timeout(60)
async def test_an_answer_that_denies_is_final_and_not_hedged(tmp_path: Path) -> None:
    init_ca(tmp_path, "hivemesh.local")
    denies, other = _Replica("denies", deny=True), _Replica("other")
    async with serving_replica(tmp_path, denies) as a1, serving_replica(tmp_path, other) as a2:
        async with _client(tmp_path, f"{a1},{a2}", 60.0) as cp:
            with pytest.raises(PermissionDeniedError):
                await asyncio.wait_for(cp.issue_token(AUDIENCE, ["echo"]), 15)
            assert (denies.calls, other.calls, cp.hedges, cp.failovers) == (1, 0, 0, 0)
            assert cp.reachable and cp.address == a1


@pytest.mark.timeout(60)
async def test_when_every_replica_is_silent_the_call_ends_within_its_timeout(tmp_path: Path) -> None:
    init_ca(tmp_path, "hivemesh.local")
    held = _Replica("held", hold=True)
    with _frozen() as frozen:
        async with serving_replica(tmp_path, held) as address:
            async with _client(tmp_path, f"{frozen},{address}", 3.0) as cp:
                with pytest.raises(ControlPlaneUnavailableError) as silent:
                    # 3 s of timeout_s; 15 s here only bounds a client that would outlive its own timeout.
                    await asyncio.wait_for(cp.issue_token(AUDIENCE, ["echo"]), 15)
                assert silent.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, silent.value
                assert cp.hedges == 1 and held.calls == 1 and cp.reachable is False
                await asyncio.wait_for(held.cancelled.wait(), 15)


@pytest.mark.timeout(90)
async def test_when_every_replica_is_slow_hedges_stay_within_the_budget(tmp_path: Path) -> None:
    """Both replicas answer, slowly: past the first few, a call hedges only once per ten calls, so an overloaded
    control plane is not sent twice the calls that made it slow."""
    init_ca(tmp_path, "hivemesh.local")
    first, second = _Replica("first", delay_s=0.9), _Replica("second", delay_s=0.9)
    async with serving_replica(tmp_path, first) as a1, serving_replica(tmp_path, second) as a2:
        async with _client(tmp_path, f"{a1},{a2}", 4.0) as cp:  # 2 s attempts, hedged after 0.75 s of silence
            assert cp.hedge_after_s == pytest.approx(0.75)
            answers = [(await asyncio.wait_for(cp.issue_token(AUDIENCE, ["echo"]), 15)).token for _ in range(10)]
            assert set(answers) <= {"first", "second"} and len(answers) == 10
            # Every call was silent past 0.75 s; 3 hedged, then one more once 10 calls had been made.
            assert cp.hedges == 4 and first.calls + second.calls == 14
