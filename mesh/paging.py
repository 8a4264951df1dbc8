"""Page tokens and sizes of the mesh's listings (ListQueued, ListEscalations): one format, one set of refusals.

A token is opaque to callers: URL-safe base64 of a version byte, an 8-byte tag of the listing's owner (a hash of
who listed: the token pages only that owner's listing, so another's or a forged one is refused, though the server
reads only what the caller may see either way), and the etcd create revision of the last item listed. Resuming by
revision rather than by position, a page goes on exactly after the last item listed, whatever was added or removed
in between.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import struct
from typing import Final

from hivemesh.mesh.errors import InvalidInputError

__all__ = ["MAX_PAGE_SIZE", "PageTokens", "page_size"]

MAX_PAGE_SIZE: Final = 1000
"""The most items in one page; a larger page_size is read as this. page_size 0 (a caller from before paging) is
this too, so such a caller still sees as many as one page holds."""
_TOKEN: Final = struct.Struct(">B8sQ")
_VERSION: Final = 1
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


def page_size(requested: int) -> int:
    """A request's page_size as served: 0 is MAX_PAGE_SIZE, and so is anything more; below 0 is
    INVALID_ARGUMENT naming page_size."""
    if requested < 0:
        msg = f"must be 0 (the default, {MAX_PAGE_SIZE}) or more (at most {MAX_PAGE_SIZE} are listed)"
        raise InvalidInputError(f"page_size {msg}, got {requested}", field_violations={"page_size": msg})
    return min(requested or MAX_PAGE_SIZE, MAX_PAGE_SIZE)


class PageTokens:
    """The page tokens of one listing (its RPC's name, which also keeps one listing's tokens from another's)."""

    def __init__(self, listing: str, owners: str) -> None:
        """owners: who a token belongs to, as its refusal says it ("identity", "caller")."""
        self.listing = listing
        self.owners = owners
        self._salt = f"hivemesh.v1 {listing} page token\0".encode()

    def _tag(self, owner: str) -> bytes:
        return hashlib.sha256(self._salt + owner.encode()).digest()[:8]

    def make(self, owner: str, revision: int) -> str:
        """The token of the page after the item created at revision, in owner's listing."""
        return base64.urlsafe_b64encode(_TOKEN.pack(_VERSION, self._tag(owner), revision)).rstrip(b"=").decode()

    def read(self, owner: str, token: str) -> int | None:
        """The revision token resumes from (None: no token, from the start). InvalidInputError naming page_token
        for a token this listing did not make, and for one made for another owner's listing."""
        if not token:
            return None
        raw = b""
        if _TOKEN_RE.fullmatch(token):
            with contextlib.suppress(ValueError):
                raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        if len(raw) != _TOKEN.size or raw[0] != _VERSION:
            msg = f"must be a next_page_token of {self.listing}, passed back unchanged"
            raise InvalidInputError(f"page_token {token[:80]!r} is not a {self.listing} page token: {msg}",
                                    field_violations={"page_token": msg})
        _, tag, revision = _TOKEN.unpack(raw)
        if tag != self._tag(owner):
            msg = (f"was given to another {self.owners}'s listing: a token pages only the listing of the "
                   f"{self.owners} that got it")
            raise InvalidInputError(f"page_token {msg}", field_violations={"page_token": msg})
        return int(revision)
