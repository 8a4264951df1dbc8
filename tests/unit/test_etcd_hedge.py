"""Which etcd errors the control plane's hedge asks a member again for (`electing`), and which mean the member
did not answer at all (`unreachable`). The errors are aetcd's own, as its client raises them."""

from __future__ import annotations

import aetcd

from hivemesh.controlplane.etcd_hedge import electing, unreachable

_FAILED = aetcd.exceptions.ConnectionFailedError
_TIMEOUT = aetcd.exceptions.ConnectionTimeoutError


def test_a_member_meeting_a_leader_election_is_asked_again() -> None:
    for words in ("etcdserver: leader changed", "etcdserver: no leader", "etcdserver: request timed out",
                  "etcdserver: request timed out, possibly due to previous leader failure"):
        assert electing(_FAILED(words)), words
        assert unreachable(_FAILED(words)), f"{words}: the hedge also goes to the other members"


def test_a_cut_member_or_a_refusal_is_not_asked_again() -> None:
    # A member that did not answer: the other members are asked, this one is not hammered.
    assert not electing(_FAILED("Stream removed (recvmsg:Connection timed out (110))"))
    assert not electing(_TIMEOUT("Deadline Exceeded"))
    assert unreachable(_TIMEOUT("Deadline Exceeded"))
    # etcd refused the request itself: asking again would get the same answer.
    refused = aetcd.exceptions.PreconditionFailedError("etcdserver: user name already exists")
    assert not electing(refused) and not unreachable(refused)
    assert not electing(aetcd.exceptions.UnauthenticatedError("etcdserver: invalid auth token"))
    assert not electing(ValueError("etcdserver: leader changed")), "only etcd's own errors"
