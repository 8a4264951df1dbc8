"""One audit log for the whole mesh, whatever replica a node ships to: its order and durability live in etcd.

Every replica keeps a full copy (`AuditStore`'s directory); etcd holds the order and a bounded window:

- `keyspace.AUDIT_LOG_TAIL` is `"<seq> <hash>"` of the log's last entry. An append (a node's shipped batch, or a
  replica's own decisions, batched) checks the node's chain against this copy, seals the entries after its
  head, and commits them as `AUDIT_LOG/<20-digit first seq>` (`batches`: a header and the zlib-compressed
  lines) in one transaction that holds only if the tail is that head; when it is not (the copy lagged, or
  another replica won a race) it catches up, checks again and retries (bounded). A batch is acknowledged only
  after etcd committed it (a quorum), so an acknowledged record survives the loss of any replica, and the
  replica then stores the entries it built (no read back). Cost: one etcd request (a transaction: two puts,
  one revision) per shipped batch, ~a sixth of the batch's size.
- Every replica applies committed batches in order into its copy (polling a range from its last seq), so any
  replica serves queries, exports and verification of the whole log, and a new leader continues its chain.
- One checkpoint key for the mesh (`AUDIT_CHECKPOINT_KEY`, root only, like the token keys): the leader alone
  signs checkpoints, commits each as `AUDIT_CHECKPOINTS/<no>` fenced by its term, and every replica copies them.
  A copy that lacks checkpoints etcd no longer holds (a new replica's, or one down while they were trimmed)
  takes the chain up at the oldest etcd holds, once that checkpoint proves its log (`_copy_checkpoints_locked`).
- Trimming: the leader deletes batches every live replica has applied (each publishes how far it got under a
  leased `AUDIT_APPLIED/<replica>`) once they are `min_age_s` old (None: never for age), and beyond `max_bytes`
  of entries in any case (each batch carries its byte offset in the log, the same in every copy). A replica
  whose copy ends before the window (or differs from it) refuses to serve audit with FAILED_PRECONDITION and says
  to restore its folder from a live replica: it never serves a log with a hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, NoReturn, TypeVar

from aetcd import rpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hivemesh.controlplane.audit import batches
from hivemesh.controlplane.audit.store import MAX_BATCH, AuditStore, Sealable
from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import AuditUnavailableError, FailedPreconditionError, HivemeshError
from hivemesh.mesh.keyspace import (
    AUDIT_APPLIED,
    AUDIT_CHECKPOINT_KEY,
    AUDIT_CHECKPOINTS,
    AUDIT_LOG,
    AUDIT_LOG_TAIL,
)
from hivemesh.mesh.watch import cancel_and_wait

log = logging.getLogger(__name__)

TXN_BYTES: Final = 1024 * 1024
"""At most this many bytes of entries per etcd transaction (etcd refuses requests over 1.5 MiB by default)."""
ATTEMPTS: Final = 8
"""Conflicting appends (another replica moved the tail first) tried again this many times, then UNAVAILABLE."""
REFUSED_COPY_PAUSE_S: Final = 0.05
"""How long a refused copy of a hedged commit holds its answer, so that the copy that committed answers first."""
_T = TypeVar("_T")

READ_LIMIT: Final = 256
"""Batches read per range request while catching up."""
TRIM_LIMIT: Final = 64
"""Batches a trimming pass looks at (the oldest); the next pass goes on."""
_TAIL: Final = AUDIT_LOG_TAIL.encode()


def seq_key(prefix: str, n: int) -> bytes:
    """The etcd key of batch/checkpoint n: zero-padded, so key order is log order."""
    return f"{prefix}{n:020d}".encode()


def _prefix_end(prefix: str) -> bytes:
    end = bytearray(prefix.encode())
    end[-1] += 1
    return bytes(end)


def _tail_value(seq: int, head: str) -> bytes:
    return f"{seq} {head}".encode()


class SharedLog:
    """A replica's side of the mesh-wide log: commit, apply, checkpoint (leader), publish progress, trim (leader).

    Every method named `*_locked` runs under the store's lock (the store calls them so)."""

    def __init__(
        self,
        etcd: Any,
        store: AuditStore,
        replica_id: str,
        *,
        leading: Callable[[], bool],
        fence: Callable[[], list[Any]],
        certify: Callable[[ed25519.Ed25519PublicKey], bytes] | None = None,
        poll_s: float = 0.5,
        linger_s: float = 0.005,
        min_age_s: float | None = 600.0,
        max_bytes: int = 256 * 1024 * 1024,
        applied_ttl_s: int = 10,
        trim_every_s: float = 10.0,
        reads: Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[Any]] | None = None,
        writes: Callable[[Callable[[Any], Awaitable[Any]]], Awaitable[Any]] | None = None,
    ) -> None:
        """reads: how the log's range reads reach etcd (the control plane passes `HedgedEtcd.run`, so a member
        cut off cannot hold a catch-up for a read's whole timeout); None: on etcd alone.

        writes: the same for the commit's transaction (the control plane hedges it too, so a member cut off
        cannot hold the store's lock, and every append behind it, for the request's whole timeout). A commit is
        a compare-and-swap on the tail, so of several copies of one at most one commits; but the answer that
        comes back first may be another copy's refusal. A refusal after more than one copy went out is
        therefore settled like a lost answer (`_settle_own_locked`): the log says whether the batch is in it."""
        self.etcd = etcd
        self._reads = reads
        self._writes = writes
        self.store = store
        self.replica_id = replica_id
        self._leading = leading
        self._fence = fence
        self._certify = certify
        self.poll_s = poll_s
        self.linger_s = linger_s
        self.min_age_s = min_age_s
        self.max_bytes = max_bytes
        self.applied_ttl_s = applied_ttl_s
        self.trim_every_s = trim_every_s
        self.conflicts = 0
        """Appends that lost the race for the tail and were tried again (for tests and the curious)."""
        self.commits = 0
        """etcd transactions that committed entries."""
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._applied_lease: int | None = None
        self._published: tuple[int, int] = (-1, -1)
        self._published_at = 0.0
        self._renewed_at = 0.0
        self._trimmed_at = 0.0
        self._in_flight: tuple[int, bytes, int, int] | None = None
        """(first seq, its entry line, entries, the line's offset in the log file) of the transaction whose answer
        is awaited, or was never heard."""
        self._unsettled: tuple[int, bytes, int, int] | None = None
        """The same for a transaction of the control plane's own records whose answer was lost: etcd may have
        committed it, and the log says whether once this copy reaches its seq (`_settle_own_locked`)."""

    def leading(self) -> bool:
        return self._leading()

    def wake(self) -> None:
        self._wake.set()

    # --- lifecycle ---
    async def start(self) -> None:
        """Adopt (or publish) the mesh's checkpoint key, seed the tail, catch up, then follow in the background."""
        await self._share_key()
        store = self.store
        async with store._lock:
            with contextlib.suppress(FailedPreconditionError):
                await self.sync_locked()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow(), name="hivemesh-audit-follow"),
                       loop.create_task(self._flush(), name="hivemesh-audit-flush")]

    async def stop(self) -> None:
        """Commit what is pending (bounded), stop following, withdraw the applied-progress key."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await cancel_and_wait(task)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0), self.store._lock:
                await self.commit_pending_locked()
        lease, self._applied_lease = self._applied_lease, None
        if lease is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.etcd.revoke_lease(lease)

    async def _share_key(self) -> None:
        store = self.store
        assert store._key is not None
        mine = store._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        t = self.etcd.transactions
        key = AUDIT_CHECKPOINT_KEY.encode()
        ok, responses = await self.etcd.transaction(compare=[t.version(key) == 0], success=[t.put(key, mine)],
                                                    failure=[t.get(key)])
        if ok:
            return
        shared = bytes(responses[0][0][0])
        if shared == mine:
            return
        loaded = serialization.load_pem_private_key(shared, password=None)
        if not isinstance(loaded, ed25519.Ed25519PrivateKey):
            raise FailedPreconditionError(f"{AUDIT_CHECKPOINT_KEY} is not an Ed25519 private key")
        store.adopt_key(loaded, shared)
        if self._certify is not None:
            store.key_cert_pem = self._certify(loaded.public_key())
        log.info("audit checkpoints: adopted the mesh-wide checkpoint key")

    # --- committing ---
    async def commit_locked(self, build: Callable[[], Awaitable[Sealable]],
                            on_commit: Callable[[int], None] | None = None, *, own: bool = False) -> int:
        """Commit what build() returns to etcd, then apply it here (and tell on_commit how many entries went);
        returns how many were committed. own: the entries are the control plane's own records, which build()
        makes anew each time (a node's records are its own chain: once in the log, build() skips them), so a
        refusal that may hide a copy that committed leaves the batch to be settled (`_unsettled`).

        The first attempt is built on this copy as it is (no read first): the transaction holds only if etcd's
        tail is this copy's head, so a copy that lagged just costs a refused attempt, after which build() runs
        again against the caught-up copy (as it does after every conflict). Once committed, the entries are
        applied as built (`write_sealed_locked`): no read back, no second parse or hash."""
        committed = 0
        conflicts = 0
        store = self.store
        caught_up = False
        items: Sealable = []
        while True:
            if not items:
                if caught_up:
                    await self.sync_locked()
                elif store.unavailable:
                    raise FailedPreconditionError(store.unavailable)
                try:
                    items = await build()  # (a node's resend may read the log, off the event loop)
                except HivemeshError:
                    if caught_up:
                        raise
                    caught_up = True  # refused on a copy that may lag (a node that shipped elsewhere): look again
                    continue
                if not items:
                    return committed
            lines, hashes = store.seal_entries(items)
            size, n = 0, 0
            for line in lines:  # one transaction's worth (at least one entry)
                if n and size + len(line) > TXN_BYTES:
                    break
                size += len(line)
                n += 1
            chunk, first, last = lines[:n], store.seq + 1, store.seq + n
            head = hashes[n - 1]
            value = batches.encode({"first": first, "last": last, "time": int(time.time()), "offset": store.size,
                                    "end": store.size + size, "head": head, "replica": self.replica_id}, chunk)
            t = self.etcd.transactions
            compare = [t.value(_TAIL) == _tail_value(store.seq, store.head),
                       t.version(seq_key(AUDIT_LOG, first)) == 0]
            success = [t.put(seq_key(AUDIT_LOG, first), value), t.put(_TAIL, _tail_value(last, head))]
            self._in_flight = (first, chunk[0].rstrip(b"\n"), n, store.size)  # kept if no answer: _unsettled
            ok, sent = await self._transaction(compare, success)
            if not ok and sent > 1 and own:
                self._unsettled = self._in_flight  # the refusal may be a second copy's, the first committed
            self._in_flight = None
            if ok:
                if self._unsettled is not None and self._unsettled[0] == first:
                    self._unsettled = None  # this batch holds its seq now: the unanswered one never will
                self.commits += 1
                store.write_sealed_locked(chunk, last, head, items[:n])
                items = items[n:]  # the rest still extends the (now longer) copy: it was checked as a chain
                committed += n
                try:
                    await store.fsync_locked()
                finally:
                    # Once durable here too, the waiting answers go (as they always did; released at the commit
                    # instead, escalations came fast enough to outrun retention in a 2 MiB quota:
                    # tests/integration/test_retention.py). A cancel at the fsync must not part the lines from
                    # the queue, or the records would be committed again.
                    if on_commit is not None:
                        on_commit(n)
                await self._after_commit_locked()
                if not items:
                    return committed
                if store.seq != last:  # a checkpoint's catch-up applied others' entries: check the rest again
                    items, caught_up = [], True
                continue
            items = []
            if not caught_up:
                caught_up = True  # the copy lagged etcd: catch up and build again (not a race lost)
                continue
            conflicts += 1
            self.conflicts += 1
            if conflicts >= ATTEMPTS:
                raise AuditUnavailableError(f"the mesh-wide audit log is busy: {conflicts} concurrent appends "
                                            "won the race for its tail; try again")
            # A replica that just won goes again at once while this one still has to read what it missed: a
            # random pause keeps one replica from starving the other.
            await asyncio.sleep(random.uniform(0, 0.005 * conflicts))

    async def _transaction(self, compare: list[Any], success: list[Any]) -> tuple[bool, int]:
        """(whether it committed, how many copies were sent) of one commit transaction, through `writes`."""
        sent = 0

        async def txn(etcd: Any) -> bool:
            nonlocal sent
            sent += 1
            ok, _ = await etcd.transaction(compare=compare, success=success, failure=[])
            if not ok and sent > 1:
                # A hedge's copies race: the one that commits makes the others' compares fail, and a refusal that
                # answered first would cost a catch-up and a settle. The committed copy's answer gets a moment.
                await asyncio.sleep(REFUSED_COPY_PAUSE_S)
            return bool(ok)

        ok = await (txn(self.etcd) if self._writes is None else self._writes(txn))
        return bool(ok), sent

    async def _after_commit_locked(self) -> None:
        store = self.store
        if store.seq - store._checkpoint_seq >= store.checkpoint_every:
            await self.checkpoint_locked(caught_up=True)  # the commit held: this copy was etcd's log then

    async def commit_pending_locked(self) -> None:
        """Commit the control plane's own records waiting in the store (in batches of at most MAX_BATCH).

        A transaction whose answer was lost (a timeout, a member cut after the leader applied it) may have
        committed: its records are settled from the log before any is built again, or each would be there twice.
        The retry settles them: on a copy that reached the lost seq, or after its refusal caught the copy up."""
        store = self.store
        taken = list(store.pending)[:MAX_BATCH]
        done = 0

        async def build() -> Sealable:
            nonlocal done
            done += self._settle_own_locked()
            return store.own_records(taken[done:])

        def on_commit(n: int) -> None:
            nonlocal done
            done += n
            for _ in range(n):
                store.pending.popleft()
            store.own_committed(n)

        while taken:
            self._in_flight = None
            try:
                await self.commit_locked(build, on_commit, own=True)
            except BaseException:
                if self._in_flight is not None:  # sent, never answered: committed or not, the log will say
                    self._unsettled, self._in_flight = self._in_flight, None
                raise
            taken, done = list(store.pending)[:MAX_BATCH], 0

    def _settle_own_locked(self) -> int:
        """Once this copy reaches the seq of a transaction whose answer was lost, whether it committed: if the
        log's entry there is the one it carried, its records leave the queue as committed. Returns how many."""
        lost = self._unsettled
        if lost is None or self.store.seq < lost[0]:
            return 0
        first, line, n, offset = lost
        self._unsettled = None
        store = self.store
        if store.line_at(offset) != line and next(store.lines(after_seq=first - 1), None) != line:
            return 0  # another batch holds that seq: the lost one can never commit (its compare fails)
        for _ in range(n):
            store.pending.popleft()
        store.own_committed(n)
        log.warning("audit: %d of the control plane's records were committed by a transaction whose answer was "
                    "lost; recognised in the log, not written again", n)
        return n

    async def _flush_once(self) -> None:
        async with self.store._lock:
            await self.commit_pending_locked()

    async def _flush(self) -> None:
        """Commit the replica's own decisions: one etcd write for all that arrived within linger_s."""
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.linger_s)
            self._wake.clear()
            try:
                # Shielded: stopping must not cut a commit between etcd's answer and dropping what it took
                # from the queue (the records would be committed twice); stop() waits for the lock instead.
                await asyncio.shield(self._flush_once())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: the records wait (bounded) for the next try
                log.warning("cannot commit the control plane's audit records yet: %r", exc)
                await asyncio.sleep(self.poll_s)
                self._wake.set()

    # --- applying ---
    async def sync_locked(self) -> None:
        """Apply every batch committed after this copy's end, then copy the checkpoints it lacks."""
        store = self.store
        if store.unavailable:
            raise FailedPreconditionError(store.unavailable)
        tail = await self._range(_TAIL, b"", limit=1)  # the batches are read at this revision: one snapshot
        if not tail.kvs:
            await self._seed_tail_locked()
            return
        revision = int(tail.header.revision)
        seq, head = bytes(tail.kvs[0].value).decode().split(" ", 1)
        while int(seq) > store.seq:
            reply = await self._range(seq_key(AUDIT_LOG, store.seq + 1), _prefix_end(AUDIT_LOG), revision=revision)
            if not reply.kvs:
                self._behind(f"the mesh-wide log ends at seq {seq} and etcd's window no longer holds seq "
                             f"{store.seq + 1}")
            for kv in reply.kvs:
                try:
                    batch, lines = batches.lines(bytes(kv.value))
                except batches.BadBatchError as err:
                    self._diverged(f"the batch at {bytes(kv.key).decode(errors='replace')} is unreadable ({err})")
                if batch["first"] != store.seq + 1:
                    self._behind(f"etcd's window of the mesh-wide log starts at seq {batch['first']}")
                await store.apply_locked(lines)
        if int(seq) != store.seq or head != store.head:
            store.unavailable = (f"this replica's audit copy (seq {store.seq}) differs from the mesh-wide log "
                                 f"(seq {seq}): restore {store.dir} from a live replica")
            log.error("%s", store.unavailable)
            raise FailedPreconditionError(store.unavailable)
        await self._copy_checkpoints_locked()

    async def _seed_tail_locked(self) -> None:
        """No tail yet: the first replica ever seeds it with its own log's end (a single control plane upgraded
        in place keeps its log), and every later one extends or copies that. A tail lost under a running mesh is
        set again from the newest batch etcd holds, so no replica's copy is left ahead of it."""
        store = self.store
        seed = _tail_value(store.seq, store.head)
        newest = await self._newest_batch()
        if newest is not None:
            seed = _tail_value(newest["last"], str(newest["head"]))
        t = self.etcd.transactions
        await self.etcd.transaction(compare=[t.version(_TAIL) == 0], success=[t.put(_TAIL, seed)], failure=[])

    def _diverged(self, why: str) -> NoReturn:
        store = self.store
        self._stop_serving(f"this replica's audit copy (seq {store.seq}) cannot follow the mesh-wide log: {why}; "
                           f"restore {store.dir} from a live replica")

    def _behind(self, why: str) -> NoReturn:
        store = self.store
        self._stop_serving(f"this replica's audit copy ends at seq {store.seq} but {why}: it cannot serve the "
                           f"audit log until {store.dir} is restored from a live replica's copy")

    def _stop_serving(self, why: str) -> NoReturn:
        """Refuse audit from now on (FAILED_PRECONDITION, saying why): never serve a log with a hole."""
        self.store.unavailable = why
        log.error("%s", why)
        raise FailedPreconditionError(why)

    async def _newest_batch(self) -> dict[str, Any] | None:
        """The header of the newest batch etcd holds (None: none)."""
        reply = await self._read(rpc.RangeRequest(
            key=AUDIT_LOG.encode(), range_end=_prefix_end(AUDIT_LOG), limit=1,
            sort_order=rpc.RangeRequest.DESCEND, sort_target=rpc.RangeRequest.KEY))
        return batches.header(bytes(reply.kvs[0].value)) if reply.kvs else None

    async def _range(self, start: bytes, end: bytes, *, limit: int = READ_LIMIT, revision: int = 0) -> Any:
        return await self._read(rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision))

    async def _read(self, request: Any) -> Any:
        """One range read, linearizable (any member answers what the leader would), through `reads`."""
        def on(etcd: Any) -> Awaitable[Any]:
            return etcd.kvstub.Range(request, timeout=10.0, metadata=etcd.metadata)  # type: ignore[no-any-return]

        if self._reads is None:
            return await on(self.etcd)
        return await self._reads(on)

    async def _write(self, fn: Callable[[Any], Awaitable[_T]]) -> _T:
        """One idempotent write (a put, a delete, a lease's grant or refresh) through `writes`, as a commit goes:
        outside the store's lock too, a member cut off must not stall this replica's progress key past its lease
        (the leader would then trim as if this replica were gone) nor the leader's trimming."""
        return await (fn(self.etcd) if self._writes is None else self._writes(fn))

    async def _copy_checkpoints_locked(self) -> None:
        """Copy the checkpoints this copy lacks, each linking to the one before it. When etcd no longer holds the
        next one (trimming keeps only the newest every live replica copied, so a replica that starts empty, or
        was down meanwhile, meets a later one), the oldest etcd holds is adopted if it proves this copy's log
        (`AuditStore.adopt_checkpoint_locked`: the mesh key's signature, over this copy's hash at its seq), and
        the rest link on from it. One that does not prove it stops this replica from serving audit (a
        checkpoint it cannot match is no proof of what it serves); it never signs past such a checkpoint."""
        store = self.store
        reply = await self._range(seq_key(AUDIT_CHECKPOINTS, store.checkpoint_no + 1), _prefix_end(AUDIT_CHECKPOINTS))
        for kv in reply.kvs:
            where = bytes(kv.key).decode(errors="replace")
            try:
                cp = json_depth.loads(kv.value)
                covers, number = int(cp["log_seq"]), int(cp["checkpoint"])
            except (ValueError, RecursionError, KeyError, TypeError):
                raise FailedPreconditionError(f"the mesh-wide log's checkpoint at {where} is unreadable") from None
            if covers > store.seq:
                break  # its entries are not here yet
            if number > store.checkpoint_no + 1:
                lacked = store.checkpoint_no
                try:
                    await store.adopt_checkpoint_locked(cp)
                except FailedPreconditionError as err:
                    self._stop_serving(
                        f"this replica's audit copy (seq {store.seq}) cannot take up the mesh-wide log's checkpoints "
                        f"at {where} (those before it were trimmed from etcd): {err}; it serves no audit log "
                        f"until {store.dir} is restored from a live replica whose `hivemesh audit verify` passes")
                log.warning("audit checkpoints: took up the mesh-wide chain at checkpoint %d (etcd trimmed %d..%d "
                            "before this copy had them): it signs this copy's hash at seq %d", number, lacked + 1,
                            number - 1, covers)
                continue
            store.keep_checkpoint(cp)

    async def checkpoint_locked(self, *, caught_up: bool = False) -> dict[str, Any] | None:
        """The leader signs the next checkpoint of its caught-up copy and commits it fenced by its term; other
        replicas sign nothing (they copy the leader's). None when not leading or nothing changed.

        caught_up: the copy is known to be the whole log (right after a commit held, whose compare was that the
        tail is this copy's head), so it is not read again first. A checkpoint signs a prefix of the log, so one
        a few entries behind another replica's append is still true; a number another leader already signed is
        refused by its compare, and that one is copied at the next sync."""
        if not self._leading():
            return None
        if not caught_up:
            await self.sync_locked()
        store = self.store
        cp = store.next_checkpoint()
        if cp is None:
            return None
        fence = self._fence()  # compares that fail once another replica leads
        if not self._leading():
            return None
        t = self.etcd.transactions
        key = seq_key(AUDIT_CHECKPOINTS, int(cp["checkpoint"]))
        # Hedged like a commit (it runs under the store's lock, in the commit path): a refused copy may be
        # another copy's loss, and then the checkpoint is this one, copied back at the next sync.
        ok, _ = await self._transaction([*fence, t.version(key) == 0], [t.put(key, json.dumps(cp).encode())])
        if not ok:
            return None  # another leader took over (or already signed this number): copy theirs next sync
        store.keep_checkpoint(cp)
        return cp

    async def _follow(self) -> None:
        """Apply what others commit, publish how far this copy got, and (leader) trim the window."""
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                async with self.store._lock:
                    if self.store.unavailable:
                        continue
                    await self.sync_locked()
                await self._publish_applied()
                if self._leading() and time.monotonic() - self._trimmed_at >= self.trim_every_s:
                    await self.trim()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: next round
                log.debug("audit log follow round failed: %r", exc)

    # --- progress and trimming ---
    async def _publish_applied(self, *, force: bool = False) -> None:
        """Keep {"seq", "checkpoint"} under this replica's leased key: renewed every TTL/3, rewritten when it
        changed but at most once a second (a follower's progress costs etcd <= 1 write/s, not one per batch)."""
        now = time.monotonic()
        lease = self._applied_lease
        if lease is not None and now - self._renewed_at >= self.applied_ttl_s / 3:
            reply = await self._write(lambda etcd: etcd.refresh_lease(lease))
            self._renewed_at = now
            if reply is None or reply.TTL <= 0:
                self._applied_lease = None
        if self._applied_lease is None:
            # A hedged grant may grant twice: the lease not kept holds no key and lapses after its TTL.
            self._applied_lease = (await self._write(lambda etcd: etcd.lease(self.applied_ttl_s))).id
            self._renewed_at = now
            self._published = (-1, -1)
        mine = (self.store.seq, self.store.checkpoint_no)
        if mine != self._published and (force or now - self._published_at >= 1.0):
            key = f"{AUDIT_APPLIED}{self.replica_id}".encode()
            value = json.dumps({"seq": mine[0], "checkpoint": mine[1]}).encode()
            lease = self._applied_lease
            await self._write(lambda etcd: etcd.put(key, value, lease=lease))
            self._published, self._published_at = mine, now

    async def trim(self) -> int:
        """Leader: delete the oldest batches every live replica applied and that are min_age_s old (and those
        past max_bytes in any case), and the checkpoints every replica copied but the newest; returns batches
        gone."""
        self._trimmed_at = time.monotonic()
        await self._publish_applied(force=True)
        applied = [json_depth.loads(kv.value) for kv in (await self._range(
            AUDIT_APPLIED.encode(), _prefix_end(AUDIT_APPLIED), limit=0)).kvs]
        if not applied:
            return 0
        upto = min(int(a["seq"]) for a in applied)
        cp_upto = min(int(a["checkpoint"]) for a in applied)
        last = await self._newest_batch()
        if last is None:
            return 0
        end_offset = last["end"]
        cutoff = None if self.min_age_s is None else time.time() - self.min_age_s
        reply = await self._range(AUDIT_LOG.encode(), _prefix_end(AUDIT_LOG), limit=TRIM_LIMIT)
        gone, end = 0, b""
        for kv in reply.kvs:
            batch = batches.header(bytes(kv.value))
            aged = cutoff is not None and int(batch["last"]) <= upto and int(batch["time"]) <= cutoff
            if aged or end_offset - int(batch["offset"]) > self.max_bytes:
                gone += 1
                end = bytes(kv.key) + b"\0"
                continue
            break
        if gone:
            await self._write(lambda etcd: etcd.delete_range(AUDIT_LOG.encode(), end))
        if cp_upto > 1:  # the newest checkpoint stays: the next leader links to it
            cp_end = seq_key(AUDIT_CHECKPOINTS, cp_upto)
            await self._write(lambda etcd: etcd.delete_range(AUDIT_CHECKPOINTS.encode(), cp_end))
        if gone:
            log.info("audit log: trimmed %d batch(es) from etcd (every live replica holds them)", gone)
        return gone
