"""The `State` service (protos/hivemesh/v1/state.proto): shared JSON documents per namespace, in etcd under
`keyspace.STATE`, served by the control plane.

Why the control plane and not etcd roles: who may read and write is per namespace and per identity (the `state`
policies, `state_policy`), namespaces are created by use (one per workflow run or conversation), and etcd roles
are static key ranges per user with no size quota. Serving it here keeps etcd closed to workloads, checks the
policy on every request (a policy change applies at once), and enforces the bounds etcd cannot:

- one value's JSON at most `max_value_bytes` (INVALID_ARGUMENT, naming the field);
- a namespace's values together at most `max_namespace_bytes` (RESOURCE_EXHAUSTED, STATE_NAMESPACE_FULL). The
  write is a transaction that also requires nothing in the namespace to have changed since the usage was read,
  so concurrent writers cannot together exceed the bound (the loser re-reads and re-checks);
- retention: with `ttl_seconds`, every write attaches a new etcd lease of that TTL, so an entry is deleted (and
  watchers see a DELETE) that long after its last write, with no sweeper. The lease the entry held before is
  revoked once the write (or delete) is done, and a write that fails revokes the lease it made, so etcd never
  keeps more leases than entries.

A value is stored as UTF-8 (never escaped to ASCII, which made an emoji 12 bytes and a 512 KiB value too large
for etcd): at most twice its JSON's bytes (escaped quotes, backslashes, newlines), under etcd's request limit,
and measured before writing (`_MAX_STORED`). A namespace is read in pages (`etcd.read_prefix`), so writes and
lists keep working up to `state_policy.MAX_NAMESPACE_BYTES` (16 MiB) and past it; one ListState answer carries at
most `LIST_MAX_BYTES` of entries (the server sends at most 8 MiB): a larger listing is refused RESOURCE_EXHAUSTED
(STATE_LIST_TOO_LARGE) naming the size, and is read by narrower `key_prefix`es or GetState per key.

Compare-and-swap names the entry's etcd mod revision; a mismatch is FAILED_PRECONDITION, reason STATE_CONFLICT,
with the current revision ("0": absent) in the error's metadata. The control plane's audit interceptor records every
call (method, caller, outcome) like any other control-plane decision.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

import aetcd
import grpc
from aetcd import rpc

from hivemesh.controlplane import json_text, policies
from hivemesh.controlplane.server import _rpc
from hivemesh.controlplane.state_policy import (
    KIND_NAME,
    Access,
    StateRules,
    check_key,
    check_key_prefix,
    check_namespace,
)
from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import (
    FailedPreconditionError,
    HivemeshError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RegistryUnavailableError,
    abort,
)
from hivemesh.mesh.etcd import MAX_REQUEST_BYTES, read_prefix, too_large
from hivemesh.mesh.etcd_roles import prefix_end
from hivemesh.mesh.keyspace import STATE
from hivemesh.mesh.pki import SpiffeId
from hivemesh.v1 import state_pb2, state_pb2_grpc

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core

log = logging.getLogger(__name__)

CONFLICT: Final = "STATE_CONFLICT"
NAMESPACE_FULL: Final = "STATE_NAMESPACE_FULL"
LIST_TOO_LARGE: Final = "STATE_LIST_TOO_LARGE"
LIST_MAX_BYTES: Final = 6 * 1024 * 1024
"""Entries one ListState answer carries at most: under the control plane's 8 MiB send limit, with room to spare."""
_MAX_STORED: Final = MAX_REQUEST_BYTES - 64 * 1024
"""One entry's key and stored document at most: etcd refuses a larger write ("request is too large")."""
_ATTEMPTS: Final = 5
_PUT, _DELETE = 0, 1  # mvccpb.Event.EventType


def ns_prefix(namespace: str) -> bytes:
    return f"{STATE}{namespace}#".encode()


def entry_key(namespace: str, key: str) -> bytes:
    return ns_prefix(namespace) + key.encode()


def _stored(value_json: str, by: str, ttl_s: int) -> bytes:
    now = int(time.time() * 1000)
    doc = {"v": value_json, "by": by, "at": now, "exp": now + ttl_s * 1000 if ttl_s else 0}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _decode(value: bytes) -> dict[str, Any]:
    try:
        doc = json_depth.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        doc = None
    return doc if isinstance(doc, dict) and isinstance(doc.get("v"), str) else {"v": "null"}


def _size(doc: dict[str, Any]) -> int:
    return len(str(doc["v"]).encode())


def _entry(namespace: str, key: str, value: bytes, revision: int) -> state_pb2.StateEntry:
    doc = _decode(value)
    return state_pb2.StateEntry(namespace=namespace, key=key, value_json=doc["v"], revision=revision,
                                updated_by=str(doc.get("by", "")), updated_at_unix_ms=int(doc.get("at", 0)),
                                expires_at_unix_ms=int(doc.get("exp", 0)))


def _conflict(namespace: str, key: str, expected: int, current: int) -> FailedPreconditionError:
    now = f"at revision {current}" if current else "absent"
    want = f"revision {expected}" if expected else "absent (create only)"
    return FailedPreconditionError(
        f"{namespace}/{key} is {now}, not {want}: read it again and retry",
        reason=CONFLICT, metadata={"current_revision": str(current), "namespace": namespace, "key": key},
    )


async def _drop_unused(etcd: Any, key: bytes, lease_id: int) -> None:
    """After a write whose transaction raised: revoke its new lease unless the key holds it (the write landed and
    only its answer was lost; revoking would delete it). Best effort: the lease's TTL ends it anyway."""
    try:
        kv = await etcd.get(key)
    except Exception as exc:  # noqa: BLE001 - etcd busy: its TTL ends it
        log.debug("could not check state lease %x: %s", lease_id, exc)
        return
    if kv is None or int(kv.lease) != lease_id:
        await _release(etcd, lease_id)


async def _release(etcd: Any, lease_id: int) -> None:
    """Revoke the lease an entry held before (it holds no key now); best effort: it expires by itself anyway."""
    try:
        await etcd.revoke_lease(lease_id)
    except Exception as exc:  # noqa: BLE001 - a lease already gone, or etcd busy: its TTL ends it
        log.debug("could not revoke state lease %x: %s", lease_id, exc)


_MAX_REVISION = 2**63 - 1
"""The watch starts after start_revision, at start_revision + 1: an etcd revision (int64) at most."""


class StateServicer(state_pb2_grpc.StateServicer):
    def __init__(self, core: Core) -> None:
        self._core = core

    async def _access(self, context: grpc.aio.ServicerContext[Any, Any], namespace: str, *, write: bool
                      ) -> tuple[SpiffeId, Access]:
        """The caller and its access to namespace (policies read per request), or PERMISSION_DENIED."""
        check_namespace(namespace)
        caller = self._core.peer(context).spiffe_id
        docs = await policies.list_policies(self._core.etcd, KIND_NAME)
        access = StateRules(tuple(docs)).access(caller, namespace)
        if not (access.write if write else access.read):
            verb = "write" if write else "read"
            raise PermissionDeniedError(
                f"{caller} may not {verb} state namespace {namespace!r}: no `state` policy lets it "
                f"(`hivemesh policy apply` a kind: state document naming it under {verb})",
                metadata={"namespace": namespace, "access": verb})
        return caller, access

    @_rpc
    async def GetState(self, request: state_pb2.GetStateRequest, context: grpc.aio.ServicerContext[Any, Any]
                       ) -> state_pb2.StateEntry:
        await self._access(context, request.namespace, write=False)
        key = check_key(request.key)
        kv = await self._core.etcd.get(entry_key(request.namespace, key))
        if kv is None:
            raise NotFoundError(f"no state at {request.namespace}/{key}",
                                metadata={"namespace": request.namespace, "key": key})
        return _entry(request.namespace, key, kv.value, int(kv.mod_revision))

    @_rpc
    async def PutState(self, request: state_pb2.PutStateRequest, context: grpc.aio.ServicerContext[Any, Any]
                       ) -> state_pb2.StateEntry:
        caller, access = await self._access(context, request.namespace, write=True)
        ns, key = request.namespace, check_key(request.key)
        json_text.load(request.value_json, "value_json")
        size, bounds = len(request.value_json.encode()), access.bounds
        if size > bounds.max_value_bytes:
            msg = f"{size} bytes is more than namespace {ns!r} allows per value ({bounds.max_value_bytes})"
            raise InvalidInputError(f"value_json: {msg}", field_violations={"value_json": msg},
                                    metadata={"max_value_bytes": str(bounds.max_value_bytes)})
        expected = request.expected_revision if request.HasField("expected_revision") else None
        etcd, k = self._core.etcd, entry_key(ns, key)
        prefix = ns_prefix(ns)
        stored = len(k) + len(_stored(request.value_json, str(caller), bounds.ttl_s))
        if stored > _MAX_STORED:  # only an etcd with a smaller request limit, or a namespace bound past the hard one
            msg = f"stored with its key and record it takes {stored} bytes; an entry may take at most {_MAX_STORED}"
            raise InvalidInputError(f"value_json: {msg}", field_violations={"value_json": msg})
        for _ in range(_ATTEMPTS):
            listed, read_at = await read_prefix(etcd, prefix)
            current = next((kv for kv in listed if bytes(kv.key) == k), None)
            current_rev = int(current.mod_revision) if current is not None else 0
            if expected is not None and expected != current_rev:
                raise _conflict(ns, key, expected, current_rev)
            used = sum(_size(_decode(kv.value)) for kv in listed if bytes(kv.key) != k)
            if used + size > bounds.max_namespace_bytes:
                raise PayloadTooLargeError(
                    f"namespace {ns!r} holds {used} bytes; {size} more would pass its bound of "
                    f"{bounds.max_namespace_bytes}: delete entries or ask for a larger max_namespace_bytes",
                    reason=NAMESPACE_FULL,
                    metadata={"namespace": ns, "used_bytes": str(used),
                              "max_namespace_bytes": str(bounds.max_namespace_bytes)})
            lease = await etcd.lease(bounds.ttl_s) if bounds.ttl_s else None
            t = etcd.transactions
            compare = [t.mod(prefix, prefix_end(prefix)) < read_at + 1]  # nothing in the namespace changed
            if expected is not None:  # and the entry is still what was read (a deletion too)
                compare.append(t.version(k) == 0 if expected == 0 else t.mod(k) == expected)
            value = _stored(request.value_json, str(caller), bounds.ttl_s)
            try:
                ok, responses = await etcd.transaction(
                    compare=compare, success=[t.put(k, value, lease=lease.id if lease else None)], failure=[])
            except aetcd.exceptions.ClientError as exc:
                if lease is not None:
                    await _drop_unused(etcd, k, lease.id)
                if too_large(exc):  # it can never succeed: not UNAVAILABLE, which clients retry
                    msg = f"etcd refused the entry ({len(k) + len(value)} bytes stored) for its size"
                    raise InvalidInputError(f"value_json: {msg}", field_violations={"value_json": msg}) from None
                raise
            except BaseException:  # cancelled mid-write: the same rule
                if lease is not None:
                    await _drop_unused(etcd, k, lease.id)
                raise
            if ok:
                if current is not None and current.lease:
                    await _release(etcd, int(current.lease))
                return _entry(ns, key, value, int(responses[0].response_put.header.revision))
            if lease is not None:  # refused by the comparison: nothing holds it
                await _release(etcd, lease.id)
        raise FailedPreconditionError(f"namespace {ns!r} changed under {_ATTEMPTS} attempts to write; try again",
                                      reason=CONFLICT, metadata={"namespace": ns, "key": key})

    @_rpc
    async def DeleteState(self, request: state_pb2.DeleteStateRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> state_pb2.DeleteStateResponse:
        await self._access(context, request.namespace, write=True)
        ns, key = request.namespace, check_key(request.key)
        etcd, k = self._core.etcd, entry_key(ns, key)
        t = etcd.transactions
        compare = []
        if request.HasField("expected_revision"):
            expected = request.expected_revision
            compare.append(t.version(k) == 0 if expected == 0 else t.mod(k) == expected)
        ok, responses = await etcd.transaction(compare=compare, success=[t.delete(k, prev_kv=True)],
                                               failure=[t.get(k)])
        if not ok:
            existing = responses[0][0] if responses and responses[0] else None
            raise _conflict(ns, key, request.expected_revision,
                            int(existing[1].mod_revision) if existing is not None else 0)
        deleted = responses[0].response_delete_range
        for prev in deleted.prev_kvs:
            if prev.lease:
                await _release(etcd, int(prev.lease))
        return state_pb2.DeleteStateResponse(deleted=deleted.deleted > 0, revision=int(deleted.header.revision))

    @_rpc
    async def ListState(self, request: state_pb2.ListStateRequest, context: grpc.aio.ServicerContext[Any, Any]
                        ) -> state_pb2.ListStateResponse:
        _caller, access = await self._access(context, request.namespace, write=False)
        ns, kp = request.namespace, check_key_prefix(request.key_prefix)
        prefix = ns_prefix(ns)
        listed, revision = await read_prefix(self._core.etcd, prefix)  # in key order, one revision
        entries = [_entry(ns, bytes(kv.key)[len(prefix):].decode(), kv.value, int(kv.mod_revision)) for kv in listed]
        wanted = [e for e in entries if e.key.startswith(kp)]
        size = sum(e.ByteSize() + 8 for e in wanted)
        if size > LIST_MAX_BYTES:
            raise PayloadTooLargeError(
                f"{len(wanted)} entries of {ns!r} under key_prefix {kp!r} take {size} bytes, more than one answer "
                f"carries ({LIST_MAX_BYTES}): list them by a longer key_prefix (e.g. {kp!r} and one more "
                "character each), or GetState them one by one",
                reason=LIST_TOO_LARGE, metadata={"namespace": ns, "key_prefix": kp, "entries": str(len(wanted)),
                                                 "listed_bytes": str(size), "max_list_bytes": str(LIST_MAX_BYTES)})
        return state_pb2.ListStateResponse(
            entries=wanted, revision=revision,
            namespace_bytes=sum(len(e.value_json.encode()) for e in entries),
            max_namespace_bytes=access.bounds.max_namespace_bytes, max_value_bytes=access.bounds.max_value_bytes)

    async def WatchState(self, request: state_pb2.WatchStateRequest, context: grpc.aio.ServicerContext[Any, Any]
                         ) -> AsyncIterator[state_pb2.StateEvent]:
        """Access is checked when the watch opens (a later policy change applies to the next watch)."""
        try:
            await self._access(context, request.namespace, write=False)
            check_key_prefix(request.key_prefix)
            if not 0 <= request.start_revision < _MAX_REVISION:
                msg = f"start_revision must be from 0 to {_MAX_REVISION - 1} (etcd's revisions are 64-bit)"
                raise InvalidInputError(msg, field_violations={"start_revision": msg})
        except HivemeshError as err:
            await abort(context, err)
        except aetcd.exceptions.ClientError as exc:
            await abort(context, RegistryUnavailableError(f"the registry (etcd) failed: {type(exc).__name__}"))
        ns = request.namespace
        prefix = ns_prefix(ns)
        watched = prefix + request.key_prefix.encode()
        create = rpc.WatchCreateRequest(key=watched, range_end=prefix_end(watched),
                                        start_revision=request.start_revision + 1 if request.start_revision else 0)
        etcd = self._core.etcd
        requests: asyncio.Queue[Any] = asyncio.Queue()
        requests.put_nowait(rpc.WatchRequest(create_request=create))

        async def request_stream() -> AsyncIterator[Any]:
            while (req := await requests.get()) is not None:
                yield req

        call = rpc.WatchStub(etcd.channel).Watch(request_stream(), metadata=tuple(etcd.metadata or ()))
        try:
            async for resp in call:
                if resp.compact_revision:
                    await abort(context, FailedPreconditionError(
                        f"revision {request.start_revision} is compacted (history starts at "
                        f"{resp.compact_revision}): list the namespace again and watch from its revision"))
                if resp.canceled:
                    await abort(context, RegistryUnavailableError(f"etcd ended the watch: {resp.cancel_reason}"))
                if resp.created:
                    rev = request.start_revision or int(resp.header.revision)
                    yield state_pb2.StateEvent(type=state_pb2.STATE_EVENT_TYPE_CREATED, revision=rev)
                for ev in resp.events:
                    kv = ev.kv
                    key = bytes(kv.key)[len(prefix):].decode()
                    rev = int(kv.mod_revision)
                    if ev.type == _DELETE:
                        yield state_pb2.StateEvent(type=state_pb2.STATE_EVENT_TYPE_DELETE, revision=rev,
                                                   entry=state_pb2.StateEntry(namespace=ns, key=key, revision=rev))
                    else:
                        yield state_pb2.StateEvent(type=state_pb2.STATE_EVENT_TYPE_PUT, revision=rev,
                                                   entry=_entry(ns, key, kv.value, rev))
        except grpc.aio.AioRpcError as exc:
            await abort(context, RegistryUnavailableError(f"the etcd watch failed: {exc.code().name}"))
        finally:
            requests.put_nowait(None)
            call.cancel()


def install(core: Core, server: grpc.aio.Server) -> None:
    """Serve State on the control plane's mutual-TLS port."""
    state_pb2_grpc.add_StateServicer_to_server(StateServicer(core), server)
