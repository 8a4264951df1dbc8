"""The servicer context of one call carried on a Link: what a unary Invoke's context would be.

A Link (`hivemesh.v1.Agent/Link`) carries many unary calls on one stream. Each call still runs the same inbound
chain, audit and handler as a unary Invoke; this context is what they see in place of gRPC's per-call one. The
link's stream gives the transport facts (the peer's verified certificate, its address); the frame gives the
call's own (its metadata, its deadline). `abort` ends only this call: it raises `FrameAborted`, which the link
turns into the call's answer frame.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Never

import grpc

_STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The gRPC status code with this number (UNKNOWN for a number gRPC does not define)."""
    return _STATUS_BY_CODE.get(value, grpc.StatusCode.UNKNOWN)


class FrameAborted(Exception):  # noqa: N818 - it is the abort itself, as grpc.aio's own AbortError
    """One link call was aborted with this status (code, message, trailing metadata)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str | bytes]]) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = trailing


class FrameContext(grpc.aio.ServicerContext[Any, Any]):
    """The context of one call on a link; the stream's context supplies the peer and its certificate."""

    __slots__ = ("_auth", "_code", "_deadline", "_details", "_metadata", "_stream", "_trailing", "received")

    def __init__(
        self,
        stream: grpc.aio.ServicerContext[Any, Any],
        metadata: Sequence[tuple[str, str]],
        timeout_s: float,
        auth_context: Mapping[str, Iterable[bytes]] | None = None,
        received: float | None = None,
    ) -> None:
        """auth_context: the stream's, when the link already has it (it is the connection's, the same for every
        call on it; gRPC builds it anew on each ask, ~14 µs with a certificate); else asked of the stream.
        received: when the link read the frame (`time.monotonic()`; default now). The deadline runs from then, as
        gRPC's runs from a call's arrival, not from when its task got to run: on a busy event loop that can be
        much later."""
        self._stream = stream
        self._auth = auth_context
        self._metadata = grpc.aio.Metadata(*metadata)
        self.received = time.monotonic() if received is None else received
        self._deadline = self.received + timeout_s if timeout_s > 0 else None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Sequence[tuple[str, str | bytes]] = ()

    # --- this call's own ------------------------------------------------------------------------------------
    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> Never:
        self._code, self._details = code, details
        raise FrameAborted(code, details, tuple(trailing_metadata or ()))

    async def abort_with_status(self, status: grpc.Status) -> Never:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def invocation_metadata(self) -> grpc.aio.Metadata | None:
        return self._metadata

    def time_remaining(self) -> float | None:  # type: ignore[override]  # grpc.aio's own says None: no deadline
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:  # type: ignore[override]  # grpc.aio's: None until one is set
        """The code set (by abort or set_code), None if none was: a call that failed without one is recorded as
        UNKNOWN (`rpcwrap.outcome_code`), never as OK."""
        return self._code

    def set_details(self, details: str) -> None:
        self._details = details

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailing = tuple(trailing_metadata or ())

    def trailing_metadata(self) -> Any:
        return self._trailing

    # --- the link's (the transport every call on it shares) -------------------------------------------------
    def peer(self) -> str:
        return self._stream.peer()

    def peer_identities(self) -> Iterable[bytes] | None:
        return self._stream.peer_identities()

    def peer_identity_key(self) -> str | None:
        return self._stream.peer_identity_key()

    def auth_context(self) -> Mapping[str, Iterable[bytes]]:
        return self._auth if self._auth is not None else self._stream.auth_context()

    def cancelled(self) -> bool:
        return self._stream.cancelled()

    def done(self) -> bool:
        return self._stream.done()

    # --- what a unary handler has no use for ----------------------------------------------------------------
    async def read(self) -> Any:
        raise RuntimeError("a call on a link is unary: there is nothing to read")

    async def write(self, message: Any) -> None:
        raise RuntimeError("a call on a link is unary: its answer is returned, not written")

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        return None  # a link call has no headers of its own

    def add_done_callback(self, callback: Any) -> None:
        raise RuntimeError("a call on a link has no done callbacks")

    def set_compression(self, compression: grpc.Compression) -> None:
        return None  # the link's stream decides compression

    def disable_next_message_compression(self) -> None:
        return None
