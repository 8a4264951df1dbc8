"""Shared state for collaborating agents: the SDK side of the control plane's `State` service.

Namespaced JSON documents (one namespace per workflow run, conversation, team...), read and written with the
workload's own mesh certificate; the control plane checks the `state` policies (who may read, who may write)
and the namespace's bounds (docs/state.md):

    state = StateClient(mesh.node.controlplane)
    entry = await state.put("workflow/client-app/r-1", "plan", {"steps": 3}, expected_revision=0)  # create only
    await state.put("workflow/client-app/r-1", "plan", {"steps": 4}, expected_revision=entry.revision)  # CAS
    async with await state.watch("workflow/client-app/r-1") as changes:
        async for change in changes: ...

A compare-and-swap that loses raises `StateConflictError` (FAILED_PRECONDITION) with the current revision;
`update()` is the read-modify-write loop around it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import grpc

from hivemesh.mesh import json_depth
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.controlplane_errors import rpc_failure
from hivemesh.mesh.errors import FailedPreconditionError, HivemeshError, InvalidInputError
from hivemesh.v1 import state_pb2, state_pb2_grpc

CONFLICT: Final = "STATE_CONFLICT"
"""The reason of a lost compare-and-swap (the control plane's `state_service.CONFLICT`)."""
NAMESPACE_FULL: Final = "STATE_NAMESPACE_FULL"


class StateConflictError(FailedPreconditionError):
    """A compare-and-swap write or delete found the entry at another revision (`current_revision`, 0: absent)."""

    reason = CONFLICT

    @property
    def current_revision(self) -> int:
        return int(self.metadata.get("current_revision", "0") or 0)


@dataclass(frozen=True)
class StateEntry:
    """One stored document."""

    namespace: str
    key: str
    value: Any
    revision: int
    """The revision to name in a compare-and-swap write."""
    updated_by: str = ""
    updated_at: float = 0.0
    expires_at: float | None = None

    @classmethod
    def from_proto(cls, e: state_pb2.StateEntry) -> StateEntry:
        return cls(namespace=e.namespace, key=e.key, value=json_depth.loads(e.value_json) if e.value_json else None,
                   revision=e.revision, updated_by=e.updated_by, updated_at=e.updated_at_unix_ms / 1000,
                   expires_at=e.expires_at_unix_ms / 1000 if e.expires_at_unix_ms else None)


@dataclass(frozen=True)
class StateListing:
    entries: list[StateEntry]
    revision: int
    """The store revision the list was read at: `watch(start_revision=...)` from it misses nothing."""
    namespace_bytes: int
    max_namespace_bytes: int
    max_value_bytes: int


@dataclass(frozen=True)
class StateChange:
    type: Literal["put", "delete"]
    key: str
    revision: int
    entry: StateEntry | None
    """The new entry (None for a delete, an expiry included)."""


class StateWatch:
    """An open watch: iterate it for changes; `close()` (or `async with`) ends it."""

    def __init__(self, call: Any, stream: AsyncIterator[Any], revision: int, *, where: str = "") -> None:
        self._call = call
        self._stream = stream
        self._where = where
        self.revision = revision
        """The store revision the watch reports changes after."""

    def __aiter__(self) -> AsyncIterator[StateChange]:
        return self._changes()

    async def _changes(self) -> AsyncIterator[StateChange]:
        try:
            async for ev in self._stream:
                if ev.type == state_pb2.STATE_EVENT_TYPE_PUT:
                    yield StateChange("put", ev.entry.key, ev.revision, StateEntry.from_proto(ev.entry))
                elif ev.type == state_pb2.STATE_EVENT_TYPE_DELETE:
                    yield StateChange("delete", ev.entry.key, ev.revision, None)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise _typed(rpc_failure(exc, self._where)) from exc

    def close(self) -> None:
        self._call.cancel()

    async def __aenter__(self) -> StateWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _typed(err: HivemeshError) -> HivemeshError:
    """err as the SDK's own type where it has one: a lost compare-and-swap is a StateConflictError (the errors
    module maps reasons to the classes it knew when it was imported, and this one is the SDK's)."""
    if err.reason == CONFLICT and not isinstance(err, StateConflictError):
        typed = StateConflictError(err.message, metadata=err.metadata)
        typed.__cause__ = err.__cause__
        return typed
    return err


def dumps(value: Any) -> str:
    """value as a JSON document the wire can carry (UTF-8): InvalidInputError otherwise, a lone surrogate too
    (ensure_ascii=False lets it through json, and the proto's UTF-8 encoding raised UnicodeEncodeError)."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        text.encode()
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidInputError(f"the state value is not a JSON document: {str(exc)[:200]}") from None
    return text


class StateClient:
    """The State service over a mutual-TLS channel to the control plane (or a ControlPlaneClient, whose renewed
    channel is looked up per call)."""

    def __init__(self, channel: grpc.aio.Channel | Any, *, timeout_s: float = 10.0) -> None:
        self._source = channel
        self.timeout_s = timeout_s

    def _stub(self) -> state_pb2_grpc.StateStub:
        return state_pb2_grpc.StateStub(getattr(self._source, "channel", self._source))

    @property
    def _where(self) -> str:
        """The control plane's address for errors ("": a bare channel, whose address is not known)."""
        return self._source.address if isinstance(self._source, ControlPlaneClient) else ""

    async def _call(self, method: str, request: Any) -> Any:
        """State.<method>; a control plane that did not answer is CONTROL_PLANE_UNAVAILABLE naming its address
        (`rpc_failure`), not the AGENT_UNAVAILABLE or bare DEADLINE_EXCEEDED gRPC's own codes map to. Through a
        ControlPlaneClient as its other calls go, so its `reachable` and replica choice follow too."""
        rpc = getattr(self._stub(), method)
        try:
            if isinstance(self._source, ControlPlaneClient):
                return await self._source.call(rpc, request, timeout_s=self.timeout_s)
            try:
                return await rpc(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise rpc_failure(exc, "", timeout_s=self.timeout_s) from exc
        except HivemeshError as err:
            typed = _typed(err)
            if typed is err:
                raise
            raise typed from err.__cause__

    async def get(self, namespace: str, key: str) -> StateEntry | None:
        """The entry at namespace/key, or None when there is none."""
        try:
            e = await self._call("GetState", state_pb2.GetStateRequest(namespace=namespace, key=key))
        except HivemeshError as err:
            if err.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return StateEntry.from_proto(e)

    async def put(self, namespace: str, key: str, value: Any, *, expected_revision: int | None = None) -> StateEntry:
        """Write value (JSON). expected_revision: None writes whatever is there, 0 creates only, N replaces only
        revision N; otherwise `StateConflictError`."""
        req = state_pb2.PutStateRequest(namespace=namespace, key=key, value_json=dumps(value))
        if expected_revision is not None:
            req.expected_revision = expected_revision
        return StateEntry.from_proto(await self._call("PutState", req))

    async def delete(self, namespace: str, key: str, *, expected_revision: int | None = None) -> bool:
        """Delete the entry (True if there was one); with expected_revision, only at that revision."""
        req = state_pb2.DeleteStateRequest(namespace=namespace, key=key)
        if expected_revision is not None:
            req.expected_revision = expected_revision
        return bool((await self._call("DeleteState", req)).deleted)

    async def list(self, namespace: str, key_prefix: str = "") -> StateListing:
        r = await self._call("ListState", state_pb2.ListStateRequest(namespace=namespace, key_prefix=key_prefix))
        return StateListing([StateEntry.from_proto(e) for e in r.entries], r.revision, r.namespace_bytes,
                            r.max_namespace_bytes, r.max_value_bytes)

    async def watch(self, namespace: str, key_prefix: str = "", *, start_revision: int = 0) -> StateWatch:
        """Open a watch of the namespace's changes after start_revision (0: from now); returns once it is in
        place, so a write made after this returns is seen."""
        req = state_pb2.WatchStateRequest(namespace=namespace, key_prefix=key_prefix, start_revision=start_revision)
        where = self._where
        call: Any = self._stub().WatchState(req)  # no deadline: a watch lasts until closed
        stream = call.__aiter__()
        try:
            first = await anext(stream, None)
        except grpc.aio.AioRpcError as exc:
            raise _typed(rpc_failure(exc, where)) from exc
        if first is None or first.type != state_pb2.STATE_EVENT_TYPE_CREATED:
            call.cancel()
            raise HivemeshError("the control plane ended the state watch before it was in place")
        return StateWatch(call, stream, first.revision, where=where)

    async def update(self, namespace: str, key: str, change: Callable[[Any], Any | Awaitable[Any]], *,
                     default: Any = None, attempts: int = 10) -> StateEntry:
        """Read-modify-write with compare-and-swap: change(current value, or default) gives the new value; a
        concurrent writer makes it read and apply change again (at most attempts times, an int >= 1)."""
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise InvalidInputError(f"attempts must be an int >= 1, not {attempts!r}",
                                    field_violations={"attempts": "must be an int >= 1"})
        for attempt in range(attempts):
            current = await self.get(namespace, key)
            value = change(current.value if current is not None else default)
            if isinstance(value, Awaitable):
                value = await value
            try:
                return await self.put(namespace, key, value,
                                      expected_revision=current.revision if current is not None else 0)
            except StateConflictError:
                if attempt + 1 == attempts:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")


__all__ = ["StateChange", "StateClient", "StateConflictError", "StateEntry", "StateListing", "StateWatch"]
