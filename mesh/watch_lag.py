"""How far a watch-fed mirror is behind its etcd store, in revisions: two ints, updated per etcd response.

`heard` is the highest store revision any response the mirror received reported (`header.revision`); `complete`
is the revision up to which the mirror is known to hold every event (a full list, the last event it applied, or
a progress notification, which etcd sends only to a watcher that has caught up). The lag is the difference: 0 when
caught up, positive while etcd has told us of revisions we have not yet been shown (a watch catching up after a
reconnect, or etcd delivering a backlog in batches). It cannot see revisions etcd never told us about (an outage:
read `hivemesh_etcd_connected` alongside).

Known limit: etcd before 3.5.8 answers a requested progress notification at once, even while the watcher is still
being sent a backlog (etcd#15220, fixed by etcd#15237), so on such an etcd the lag can read 0 during a catch-up that
outlasts a probe interval. It errs low, never high; PrefixCache does not request one right at watch creation, where
that race is easiest to hit.
"""

from __future__ import annotations


class RevisionLag:
    """The `heard` and `complete` revisions of one mirror; both only move forward."""

    __slots__ = ("complete", "heard")

    def __init__(self) -> None:
        self.heard = 0
        self.complete = 0

    def hear(self, revision: int) -> None:
        """etcd said the store is at `revision` (any response header)."""
        if revision > self.heard:
            self.heard = revision

    def complete_to(self, revision: int) -> None:
        """The mirror now holds every event up to `revision` (which the store has therefore reached)."""
        if revision > self.complete:
            self.complete = revision
        self.hear(revision)

    @property
    def lag(self) -> int:
        return max(0, self.heard - self.complete)
