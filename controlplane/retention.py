"""Retention: what the control plane deletes from etcd, and when, so a long-running mesh never fills its quota.

etcd keeps every revision of every key until it is compacted, and nothing else deleted finished workflow runs,
resolved escalations or stale revocations: a busy mesh filled the 1 GiB quota and etcd then refused every write
(NOSPACE), registrations included. One loop, on the leading control-plane replica only (`leader_duty`, its
deletes fenced on the leader's term), does, every `interval`:

- **compaction**: etcd history is compacted to the newest revision that is both older than `history` and at
  least `history_revisions` behind the head. Watchers resuming from a compacted revision re-list
  (`hivemesh.mesh.watch`), so compaction never loses an update;
- **workflows**: a run in a terminal state (COMPLETED, FAILED, CANCELED, REJECTED) whose last event is older
  than `workflows` loses its events, owner key and index entry, in one transaction that fails if the run
  changed since it was read. Run ids are `<kind>-<name>/<local>` (`hivemesh.mesh.run_ids`); an index key that
  does not parse as one is left alone and logged, since the prefix it would delete could be an owner's;
- **escalations**: a resolved escalation (approved, rejected, canceled or expired; a pending one past its
  deadline is settled first, as any read would) whose resolution is older than `escalations` is deleted, unless
  the run waiting on it still exists and is not finished (it may need the answer on resume);
- **revocations**: entries live under leases that end when no token they cover can be valid; an entry whose
  `expires_at` is older than `revocations` (its lease was lost, or it was written without one) is deleted.

Each pass that deletes something or compacts is recorded in the control plane's audit log (a `controlplane`
record, event `retention`). Settings come from `hivemesh controlplane --retention` / HIVEMESH_RETENTION
(`hivemesh.controlplane.retention_config`); the defaults are in docs/resilience.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aetcd.utils

from hivemesh.controlplane.escalations import PREFIX as ESCALATIONS_PREFIX
from hivemesh.controlplane.escalations import EscalationStore
from hivemesh.controlplane.leader import leader_duty
from hivemesh.controlplane.retention_config import RetentionConfig
from hivemesh.mesh import json_depth
from hivemesh.mesh.etcd import PREFIX
from hivemesh.mesh.keyspace import TERMINAL_RUN_STATES as TERMINAL
from hivemesh.mesh.keyspace import WORKFLOW_INDEX as INDEX
from hivemesh.mesh.revocation import REVOKED_PREFIX, Revocation
from hivemesh.mesh.run_ids import parse_run_id, run_prefix
from hivemesh.mesh.watch import cancel_and_wait
from hivemesh.v1 import escalation_pb2

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core

log = logging.getLogger(__name__)

Recorder = Callable[[Mapping[str, Any]], Awaitable[Any]]
T = TypeVar("T")
_AUDITED_IDS: Final = 50
"""At most this many ids are named in one audit record (the count is always exact)."""
# --- the selection rules (pure: what is deleted when) -------------------------------------------------------------
def _older(at: float, keep_s: float | None, now: float) -> bool:
    return keep_s is not None and at + keep_s <= now


def workflow_due(summary: Mapping[str, Any], now: float, keep_s: float | None) -> bool:
    """A run's index entry (`WorkflowState.summary()`): finished, and its last event older than keep_s."""
    try:
        updated = float(summary.get("updated_at") or summary.get("created_at") or 0.0)
    except (TypeError, ValueError):
        return False
    state = summary.get("state")
    return isinstance(state, str) and state in TERMINAL and updated > 0 and _older(updated, keep_s, now)


def escalation_due(esc: escalation_pb2.Escalation, now: float, keep_s: float | None, *, run_open: bool) -> bool:
    """Resolved (not pending), resolved longer than keep_s ago, and no unfinished run waits on it."""
    if esc.status in (escalation_pb2.ESCALATION_STATUS_PENDING, escalation_pb2.ESCALATION_STATUS_UNSPECIFIED):
        return False
    if run_open:
        return False
    resolved_ms = esc.resolution.resolved_at_unix_ms or esc.created_at_unix_ms
    return resolved_ms > 0 and _older(resolved_ms / 1000.0, keep_s, now)


def revocation_due(rev: Revocation, now: float, keep_s: float | None) -> bool:
    """No token it covers can still be valid, and that has been so for keep_s."""
    return rev.expires_at > 0 and _older(rev.expires_at, keep_s, now)


def compaction_target(
    samples: deque[tuple[float, int]], now: float, head: int, history_s: float | None, history_revisions: int
) -> int:
    """The revision to compact to (0: none): the newest sampled revision at least history_s old, and at least
    history_revisions behind head. samples are (time, head revision) pairs, oldest first."""
    if history_s is None:
        return 0
    old_enough = 0
    for at, rev in samples:
        if at + history_s <= now:
            old_enough = rev
        else:
            break
    return max(0, min(old_enough, head - history_revisions))


# --- the loop -----------------------------------------------------------------------------------------------------
@dataclass
class PassReport:
    """What one pass did (for the audit log, the logs and tests)."""

    compacted_to: int = 0
    workflows: list[str] = field(default_factory=list)
    escalations: list[str] = field(default_factory=list)
    revocations: list[str] = field(default_factory=list)


class Retention:
    """The retention loop as a control-plane feature (start/stop); `run_once()` is one pass."""

    def __init__(self, etcd: Any, config: RetentionConfig, recorder: Recorder | None = None,
                 clock: Callable[[], float] = time.time, leading: Callable[[], bool] = lambda: True,
                 fence: Callable[[], list[Any]] = list) -> None:
        self.etcd = etcd
        self.leading = leading
        """Whether this replica runs the passes now (one writer among control-plane replicas)."""
        self.fence = fence
        """etcd compares that hold only while this replica's leadership term lasts (`LeaderElection.fence`)."""
        self._fence: list[Any] = []
        self.config = config
        self.recorder = recorder
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._compacted = 0
        self._task: asyncio.Task[None] | None = None
        self.passes = 0
        self.totals = {"workflows": 0, "escalations": 0, "revocations": 0}

    async def start(self) -> None:
        if self.config.enabled:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="hivemesh-retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _loop(self) -> None:
        await leader_duty("retention", self.leading, self.run_once, self.config.interval_s)

    async def run_once(self) -> PassReport:
        """One pass: delete what is due, then compact (so the deletions' history goes too, a pass later)."""
        cfg, now = self.config, self._clock()
        report = PassReport()
        self._fence = self.fence()  # this term's: a pass outlived by its leadership deletes nothing more
        # Each part on its own: one that fails (an entry no reader foresaw, etcd a moment away) must not skip the
        # others, compaction least of all, or etcd fills up until it refuses every write.
        report.workflows = await self._part("workflows", self._workflows(now), [])
        report.escalations = await self._part("escalations", self._escalations(now), [])
        report.revocations = await self._part("revocations", self._revocations(now), [])
        report.compacted_to = await self._part("compaction", self._compact(now), 0)
        self.passes += 1
        for what in ("workflows", "escalations", "revocations"):
            ids: list[str] = getattr(report, what)
            self.totals[what] += len(ids)
            if ids:
                keep = getattr(cfg, f"{what}_s")
                log.info("retention deleted %d %s older than %s s", len(ids), what, keep)
                await self._audit({"action": "deleted", "what": what, "count": len(ids),
                                   "ids": ids[:_AUDITED_IDS], "older_than_s": keep})
        if report.compacted_to:
            await self._audit({"action": "compacted", "revision": report.compacted_to})
        return report

    async def _part(self, what: str, work: Awaitable[T], failed: T) -> T:
        try:
            return await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged; the pass goes on with the next part
            log.error("retention of %s failed this pass (the others go on): %r", what, exc)
            return failed

    async def _audit(self, fields: Mapping[str, Any]) -> None:
        if self.recorder is None:
            return
        try:
            await self.recorder({"event": "retention", **fields})
        except Exception:
            log.exception("could not record a retention pass in the audit log")

    async def _delete_if_unchanged(self, key: bytes, mod_revision: int, *, prefix: bytes | None = None) -> bool:
        tx = self.etcd.transactions
        success = [tx.delete(key)]
        if prefix is not None:
            success.append(tx.delete(prefix, aetcd.utils.prefix_range_end(prefix)))
        ok, _ = await self.etcd.transaction(compare=[tx.mod(key) == mod_revision, *self._fence], success=success,
                                            failure=[])
        return bool(ok)

    async def _workflows(self, now: float) -> list[str]:
        keep = self.config.workflows_s
        if keep is None:
            return []
        deleted: list[str] = []
        for kv in await self.etcd.get_prefix(INDEX.encode()):
            if len(deleted) >= self.config.batch:
                break
            wid = kv.key.decode(errors="replace")[len(INDEX):]
            try:
                run = parse_run_id(wid)
            except ValueError:
                log.warning("retention: skipping workflow index key %r (not a run id)", wid[:200])
                continue
            try:
                summary = json_depth.loads(kv.value)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(summary, dict) and workflow_due(summary, now, keep) and await self._delete_if_unchanged(
                kv.key, int(kv.mod_revision), prefix=run_prefix(run).encode()
            ):
                deleted.append(wid)
        return deleted

    async def _open_runs(self) -> set[str]:
        """Workflow runs that exist and are not finished (their escalations are kept)."""
        out: set[str] = set()
        for kv in await self.etcd.get_prefix(INDEX.encode()):
            try:
                summary = json_depth.loads(kv.value)
            except (ValueError, RecursionError):
                summary = None
            state = summary.get("state") if isinstance(summary, dict) else None
            if not isinstance(state, str) or state not in TERMINAL:
                out.add(kv.key.decode(errors="replace")[len(INDEX):])
        return out

    async def _escalations(self, now: float) -> list[str]:
        keep = self.config.escalations_s
        if keep is None:
            return []
        store = EscalationStore(self.etcd, self.recorder)
        open_runs: set[str] | None = None
        deleted: list[str] = []
        for esc in await store.all():  # settles the pending ones past their deadline (audited there)
            if len(deleted) >= self.config.batch:
                break
            if esc.status == escalation_pb2.ESCALATION_STATUS_PENDING:
                continue
            if esc.workflow_id and open_runs is None:
                open_runs = await self._open_runs()
            run_open = bool(esc.workflow_id) and esc.workflow_id in (open_runs or set())
            if not escalation_due(esc, now, keep, run_open=run_open):
                continue
            found = await store.read(esc.id)
            if found is not None and found[0].status == esc.status and await self._delete_if_unchanged(
                (ESCALATIONS_PREFIX + esc.id).encode(), found[1]
            ):
                deleted.append(esc.id)
        return deleted

    async def _revocations(self, now: float) -> list[str]:
        keep = self.config.revocations_s
        if keep is None:
            return []
        deleted: list[str] = []
        for kv in await self.etcd.get_prefix(REVOKED_PREFIX.encode()):
            if len(deleted) >= self.config.batch:
                break
            try:
                rev = Revocation.from_json(kv.value)
            except (ValueError, TypeError):
                continue
            if revocation_due(rev, now, keep) and await self._delete_if_unchanged(kv.key, int(kv.mod_revision)):
                deleted.append(rev.jti or rev.subject)
        return deleted

    async def _compact(self, now: float) -> int:
        cfg = self.config
        head = int((await self.etcd.get_prefix(f"{PREFIX}-retention".encode(), keys_only=True)).header.revision)
        self._samples.append((now, head))
        target = compaction_target(self._samples, now, head, cfg.history_s, cfg.history_revisions)
        while len(self._samples) > 1 and self._samples[1][1] <= target:
            self._samples.popleft()  # samples at or before the target are no longer needed (keep the last one)
        if target <= self._compacted:
            return 0
        try:
            await self.etcd.compact(target)
        except Exception as exc:  # already compacted (another control plane, etcdctl): note it
            if "compacted" not in str(exc).lower():
                raise
        self._compacted = target
        return target


def _recorder(core: Core) -> Recorder:
    """The control plane's own audit log (imported here: the audit feature imports the server's Core)."""
    from hivemesh.controlplane.audit.store import audit_store

    return audit_store(core).record


def install(core: Core, server: Any) -> Retention | None:
    """The retention loop, run for the control plane's lifetime (no service to add to the server)."""
    config: RetentionConfig = core.config.retention
    if not config.enabled:
        log.warning("retention is off: etcd history and finished runs grow until the quota refuses writes")
        return None
    from hivemesh.controlplane.replicas import is_leader, leader_fence

    return Retention(core.etcd, config, _recorder(core), leading=lambda: is_leader(core),
                     fence=lambda: leader_fence(core))
