"""Shadow traffic: mirror a share of a capability's answered calls to a candidate version and compare answers.

A `routes` document's `shadow` block names the candidate (version or labels), the share (`percent`), its own
timeout, a bound on mirrored calls in flight, and how answers compare ("json": equal parsed JSON, key order
ignored; "exact": equal bytes). The candidate never serves real traffic: the route leaves it out of selection.

The caller never waits for the shadow: once the primary answered, the same request is sent to a candidate in a
fire-and-forget task, and the caller already has its answer. Each mirrored call ends as one result: `same`,
`different`, `error` (the shadow failed or timed out), or it is not sent: `dropped` (the in-flight bound is
full). Results feed `hivemesh_shadow_calls_total{capability,result}`; every `different` and `error` is also
written to the audit log (kind "shadow") so the difference rate can be inspected call by call. The record's
`caller` is this node: the mirrored call goes out with its certificate and its token, like its own calls.

Only idempotent capabilities are mirrored (the request runs twice), unless the shadow is marked `sandbox` (the
candidate has no real effects). Policy validation refuses a non-sandbox shadow of a capability a live instance
declares non-idempotent; here, the same rule is enforced per call for capabilities registered later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, Protocol

from hivemesh.mesh import json_fast
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.instance_ref import instance_key
from hivemesh.mesh.outbound.call import Metadata, OutboundCall, idempotent
from hivemesh.mesh.resilience.routes import ShadowRule
from hivemesh.v1 import agent_pb2, mesh_pb2

log = logging.getLogger(__name__)

SHADOW_HEADER: Final = "x-hivemesh-shadow"
"""Metadata on a mirrored call, so the candidate (and its logs) can tell shadow calls from real ones."""

RESULTS: Final = ("same", "different", "error", "dropped")


class ShadowListener(Protocol):
    def shadowed(self, capability: str, result: str) -> None:
        """One mirrored call ended (or was dropped) with result, one of RESULTS."""


Send = Callable[[mesh_pb2.AgentInstance, str, bytes, Metadata, float], Awaitable[bytes]]
"""send(instance, capability, raw request, metadata, timeout) -> raw InvokeResponse (raises HivemeshError)."""


def same_answer(primary: bytes, shadow: bytes, compare: str) -> bool:
    """Do two serialized InvokeResponses say the same thing? Hops and usage are ignored (they always differ)."""
    a, b = agent_pb2.InvokeResponse.FromString(primary), agent_pb2.InvokeResponse.FromString(shadow)
    if a.state != b.state or a.content_type != b.content_type:
        return False
    if compare == "json":
        try:
            return bool(json_fast.loads(a.output or b"null") == json_fast.loads(b.output or b"null"))
        except (ValueError, RecursionError):
            pass  # not JSON (or nested past what json reads): compare the bytes
    return a.output == b.output


class ShadowTraffic:
    """Mirrors calls for one node's outbound pipeline; see the module docstring. Runs on the event loop."""

    def __init__(
        self, send: Send, *, listener: ShadowListener | None = None, caller: Callable[[], str] | None = None
    ) -> None:
        """caller() is the identity send() calls as (this node's SPIFFE id), for the audit record."""
        self._send = send
        self.listener = listener
        self._caller = caller
        self.recorder: Callable[[Mapping[str, Any]], object] | None = None
        """Writes one audit record (the node's AuditLog.record); set by whoever owns the audit log."""
        self._acc: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.counts: dict[str, int] = dict.fromkeys(RESULTS, 0)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def _sampled(self, capability: str, percent: float) -> bool:
        # Deterministic share: 10% mirrors exactly every 10th call, not 10% on average.
        acc = self._acc.get(capability, 0.0) + percent
        if acc >= 100.0:
            self._acc[capability] = acc - 100.0
            return True
        self._acc[capability] = acc
        return False

    def mirror(
        self,
        call: OutboundCall,
        rule: ShadowRule,
        live: Callable[[], Sequence[mesh_pb2.AgentInstance]],
        primary: bytes,
        primary_instance: mesh_pb2.AgentInstance,
    ) -> bool:
        """Start mirroring call (answered with primary) if it is sampled; never blocks or raises. live() lists
        the capability's live instances (read only for a sampled call). True if a task started."""
        cap = call.capability
        if not self._sampled(cap, rule.percent):
            return False
        try:
            instances = live()
        except HivemeshError:  # every instance just went away: nothing to mirror to
            return False
        primary_key = instance_key(primary_instance)
        candidates = [i for i in instances if rule.subset.matches(i) and instance_key(i) != primary_key]
        if not candidates:
            return False
        candidate = candidates[sum(self.counts.values()) % len(candidates)]
        if not rule.sandbox and not idempotent(candidate, cap):
            log.warning("not mirroring %s: it is not idempotent and the shadow is not a sandbox", cap)
            return False
        if len(self._tasks) >= rule.max_in_flight:
            self._count(cap, "dropped")
            return False
        task = asyncio.get_running_loop().create_task(
            self._run(call, rule, candidate, primary), name=f"hivemesh-shadow:{cap}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(
        self, call: OutboundCall, rule: ShadowRule, candidate: mesh_pb2.AgentInstance, primary: bytes
    ) -> None:
        cap = call.capability
        detail = ""
        try:
            async with asyncio.timeout(rule.timeout_s):
                raw = await self._send(candidate, cap, call.raw, (*call.metadata, (SHADOW_HEADER, "1")),
                                       rule.timeout_s)
            result = "same" if same_answer(primary, raw, rule.compare) else "different"
        except TimeoutError:
            result, detail = "error", f"no answer within {rule.timeout_s:g} s"
        except HivemeshError as err:
            result, detail = "error", f"{err.code.name} {err.reason}: {err.message}"
        except Exception as exc:  # noqa: BLE001 - a shadow's failure must never reach anyone but the metric
            result, detail = "error", repr(exc)
        self._count(cap, result)
        if result != "same" and self.recorder is not None:
            try:
                self.recorder({"kind": "shadow", "capability": cap[:128], "decision": result,
                               "caller": self._caller() if self._caller is not None else "",
                               "agent": candidate.identity, "target_instance": candidate.instance_id,
                               "version": candidate.card.version, "message": detail[:512]})
            except Exception as exc:  # noqa: BLE001 - auditing a shadow must not fail anything
                log.warning("cannot audit a shadow call of %s: %r", cap, exc)

    def _count(self, capability: str, result: str) -> None:
        self.counts[result] += 1
        if self.listener is not None:
            self.listener.shadowed(capability, result)

    async def drain(self) -> None:
        """Wait for the mirrored calls in flight (each is bounded by its own timeout)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel the mirrored calls in flight."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
