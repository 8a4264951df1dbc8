"""Whether one answer fits the gRPC message, or on a Link the answer frame, that must carry it.

An answer one message cannot carry was refused by gRPC after the inbound chain, with its own "Sent message larger
than max", naming neither the capability nor what to do; on a Link, the oversized frame ended the whole link. Refused
inside the chain instead, the caller learns both, and the call's audit record is that refusal. The handlers measure
what they answer (`sdk/servicer.py`, `mesh/sidecar.py`); the chain measures again what an answering layer rewrote
(a signature added, a redaction longer than the text it replaced), and the link server the frame itself.
"""

from __future__ import annotations

import contextvars
from typing import Final

from hivemesh.mesh import link_wire
from hivemesh.mesh.errors import PayloadTooLargeError

ANSWER_HEADS: Final = 23
"""The most bytes an answer frame adds around its response: the id's tag and varint (1 + 10), the answer's tag and
length (1 + 5), the response's tag and length (1 + 5)."""
CALL_ID: Final[contextvars.ContextVar[int | None]] = contextvars.ContextVar("hivemesh_link_call_id", default=None)
"""The id of the link call the current task serves (`LinkServer._run` sets it in each call's own task; the context
the servicer sees is the chain's, not the frame's); None outside a link call."""


def answer_too_large(capability: str, size: int, limit: int, *, on: str = "",
                     streamed: bool = False) -> PayloadTooLargeError:
    """The caller's error for an answer that one gRPC message cannot carry: named, with its size and the limit, and
    what the capability's author can do (streamed: the answer is one item of a stream already)."""
    advice = ("put less in one item: a stream carries the rest in more items" if streamed
              else "answer less, or stream it (a streaming capability, called with InvokeStream)")
    return PayloadTooLargeError(
        f"capability {capability or '(unknown)'!r} answered {size} bytes{on}, more than the {limit} bytes one "
        f"message may carry: {advice}",
        metadata={"capability": capability, "size": str(size), "limit": str(limit)})


def refusal(capability: str, response: bytes, limit: int, *, on: str = "",
            streamed: bool = False) -> PayloadTooLargeError | None:
    """The PAYLOAD_TOO_LARGE an answer of these bytes gets (None when it goes out): over limit itself, or, served on a
    link (`CALL_ID`), as its answer frame. One comparison for any answer well under the limit."""
    size = len(response)
    if size + ANSWER_HEADS <= limit:
        return None
    if size > limit:
        return answer_too_large(capability, size, limit, on=on, streamed=streamed)
    call_id = CALL_ID.get()
    if call_id is None:
        return None
    framed = link_wire.answer_frame(call_id, response).size
    if framed <= limit:
        return None
    return answer_too_large(capability, framed, limit, on=f"{on} as a Link answer frame", streamed=streamed)
