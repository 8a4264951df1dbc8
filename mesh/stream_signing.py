"""Signed streamed answers: one signature on the final chunk over the running digest of every chunk.

Why the final chunk, not every chunk: one ES256 signature and one verification per stream instead of per chunk
(a token stream has hundreds), and the running digest gives the same guarantee at the end. Every chunk, final
included, is fed in order into a SHA-256 bound to the request digest (index and length-prefixed fields, so no
chunk can move, merge or split); the final chunk carries the agent's detached JWS (`typ` STREAM) over that digest
and the chunk count. A tampered, reordered or dropped chunk makes the digest differ, and a stream cut short has
no signed final chunk: the caller refuses either (SIGNATURE_INVALID). The cost of this choice: chunks reach the
caller before they are proven; a consumer that may act only on proven data keeps them until the stream ends
without error. Hops and usage are not signed (a forwarder appends its hop after the agent signed).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

from hivemesh.mesh.errors import SignatureInvalidError
from hivemesh.v1 import agent_pb2

STREAM: Final = "hivemesh-stream"
"""The `typ` of a stream's signature (an answer's signature cannot stand in for it, nor the reverse)."""
_HEAD: Final = struct.Struct(">QQ")  # chunk index, data length
_TAIL: Final = struct.Struct(">q?Q")  # state, final, content type length


def _field(h: hashlib._Hash, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    h.update(len(raw).to_bytes(8, "big"))
    h.update(raw)


class StreamDigest:
    """The running digest of a stream's chunks (both sides compute it the same way)."""

    def __init__(self, request_digest: bytes) -> None:
        self._h = hashlib.sha256()
        _field(self._h, STREAM)
        _field(self._h, request_digest)
        self.count = 0
        self.final = False

    def add(self, chunk: agent_pb2.InvokeChunk) -> None:
        """Feed the next chunk (raises SignatureInvalidError for a chunk after the final one)."""
        if self.final:
            raise SignatureInvalidError("the signed stream goes on after its final chunk")
        data, content_type = chunk.data, chunk.content_type.encode()
        h = self._h  # fixed-size fields and length prefixes: one unambiguous encoding, three updates per chunk
        h.update(_HEAD.pack(self.count, len(data)))
        h.update(data)
        h.update(_TAIL.pack(int(chunk.state), chunk.final, len(content_type)) + content_type)
        self.count += 1
        self.final = chunk.final

    def value(self) -> bytes:
        """The digest of the chunks so far and their count: what the final chunk's signature covers."""
        h = self._h.copy()
        _field(h, self.count.to_bytes(8, "big"))
        return h.digest()


__all__ = ["STREAM", "StreamDigest"]
