"""etcd requests of the control plane's issuing path that one cut-off member cannot fail: hedged on every member.

The control plane's etcd client round-robins over the members. A member cut off by a partition keeps a
connection that looks ready until a keepalive ping goes unanswered (up to ~12 s), so a request round robin hands
it hangs, or fails once the kernel gives up on the connection (`ConnectionFailedError: Stream removed
(recvmsg:Connection timed out (110))`). Measured in the multi-host test's leader-host cut: the surviving
replica's `IssueToken` read the grants through the cut member and answered REGISTRY_UNAVAILABLE, after the
client had already spent its first attempt on the cut replica, so one token request per run failed
(docs/multihost.md).

`HedgedEtcd.run(fn)` sends fn through the round-robin client; when that fails with a connection error or has not
answered within `after_s`, fn also goes to every member over a channel of its own, and the first answer wins.
fn must be safe to run more than once at a time: reads, or the create-if-absent user and role writes of
`ensure_workload_user`.

When the cut member was etcd's leader, the others' linearizable reads wait for a new one and then fail with
"etcdserver: leader changed" (seen in the multi-host test's etcd logs). Such a member is up and about to answer,
so it is asked again (`electing`); given up on, the hedge waited on the cut member alone until its timeout, and
the replica's `IssueToken` outlived the client's share of its deadline (one CI run of the multi-host test).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import aetcd
import grpc

from hivemesh.mesh.etcd import Endpoints, parse_endpoints
from hivemesh.mesh.lease_rescue import member_clients

_T = TypeVar("_T")

HEDGE_AFTER_S: Final = 0.3
"""How long the round-robin request has before every member is asked too: a healthy read takes milliseconds."""

_RETRYABLE_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_AGAIN_PAUSE_S: Final = 0.1
"""The first pause before a member that answered `electing` is asked again (doubling up to `_AGAIN_PAUSE_MAX_S`)."""
_AGAIN_PAUSE_MAX_S: Final = 0.25

_ELECTING: Final = ("leader changed", "no leader", "request timed out")
"""etcd's words for a request that met a leader election (server/etcdserver/errors.go: ErrLeaderChanged,
ErrNoLeader, ErrTimeout and ErrTimeoutDueToLeaderFail)."""


def unreachable(exc: BaseException) -> bool:
    """Whether exc says the member did not answer (so another member may), not that etcd refused the request."""
    if isinstance(exc, aetcd.exceptions.ConnectionFailedError | aetcd.exceptions.ConnectionTimeoutError):
        return True
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in _RETRYABLE_CODES
    return isinstance(exc, TimeoutError | ConnectionError)


def electing(exc: BaseException) -> bool:
    """Whether exc is a member saying its cluster is choosing a leader: it answers once one is chosen."""
    if not isinstance(exc, aetcd.exceptions.ClientError | grpc.aio.AioRpcError):
        return False
    text = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    return any(words in (text or "") for words in _ELECTING)


class HedgedEtcd:
    """Run idempotent etcd requests on `primary` (the round-robin client), hedged on every member of endpoints.

    With one endpoint there is no other member to ask: requests go to primary alone. The member clients are made
    on first need and kept (warm channels for the next cut); `close()` closes them.
    """

    def __init__(
        self, primary: Any, endpoints: Endpoints, *, after_s: float = HEDGE_AFTER_S, timeout_s: float = 5.0
    ) -> None:
        self.primary = primary
        self.endpoints = endpoints
        self.after_s = after_s
        self.timeout_s = timeout_s
        self.hedges = 0
        """How many requests went to every member (the round-robin one was slow or failed)."""
        self.asked_again = 0
        """How many times a member that answered `electing` was asked again."""
        self._members: list[aetcd.Client] | None = None
        self._several = len(parse_endpoints(endpoints)) > 1

    async def run(
        self, fn: Callable[[Any], Awaitable[_T]], *, after_s: float | None = None, timeout_s: float | None = None
    ) -> _T:
        """fn(client)'s first answer; raises a request's error when etcd refused it, or the last error (as an
        aetcd ConnectionTimeoutError when nobody answered within timeout_s) when no member could answer.
        after_s and timeout_s override this hedge's own for one request (a large read hedges later)."""
        if not self._several:
            return await fn(self.primary)
        after_s = self.after_s if after_s is None else after_s
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        first = asyncio.ensure_future(fn(self.primary))
        tasks = [first]
        try:
            done, _ = await asyncio.wait(tasks, timeout=after_s)
            error: BaseException | None = None
            if done:
                error = first.exception()
                if error is None:
                    return first.result()
                if not unreachable(error):
                    raise error
                tasks = []
            self.hedges += 1
            budget = max(0.1, timeout_s - after_s)
            until = asyncio.get_running_loop().time() + budget
            tasks += [asyncio.create_task(self._on(c, fn, until)) for c in self._member_clients()]
            try:
                async with asyncio.timeout(budget):
                    for next_done in asyncio.as_completed(tasks):
                        try:
                            return await next_done
                        except asyncio.CancelledError:
                            raise
                        except Exception as exc:
                            if not unreachable(exc):
                                raise
                            error = exc
            except TimeoutError:
                raise aetcd.exceptions.ConnectionTimeoutError(
                    f"no etcd member answered within {timeout_s:.1f} s") from error
            raise error if error is not None else aetcd.exceptions.ConnectionFailedError("no etcd member")
        finally:
            for task in (first, *tasks):
                task.cancel()
            await asyncio.gather(first, *tasks, return_exceptions=True)

    async def _on(self, c: aetcd.Client, fn: Callable[[Any], Awaitable[_T]], until: float) -> _T:
        """fn on one member, asked again while it answers `electing` and a pause still ends before `until`."""
        loop = asyncio.get_running_loop()
        pause = _AGAIN_PAUSE_S
        await c.connect()
        while True:
            try:
                return await fn(c)
            except Exception as exc:
                if not electing(exc) or loop.time() + pause >= until:
                    raise
            self.asked_again += 1
            await asyncio.sleep(pause)
            pause = min(2 * pause, _AGAIN_PAUSE_MAX_S)

    def _member_clients(self) -> list[aetcd.Client]:
        if self._members is None:
            self._members = member_clients(self.endpoints, self.timeout_s)
        return self._members

    async def close(self) -> None:
        members, self._members = self._members or [], None
        for c in members:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await c.close()
