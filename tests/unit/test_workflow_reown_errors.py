"""Which errors make a workflow's owner own its run again and replay it, rather than fail it
(`hivemesh.sdk.workflow.reown.etcd_unreachable`): etcd not answering, in any of the forms it reaches the engine."""

from __future__ import annotations

import pytest
from aetcd.exceptions import ConnectionFailedError, ConnectionTimeoutError

from hivemesh.mesh.errors import InvalidInputError, PermissionDeniedError, RegistryUnavailableError
from hivemesh.sdk.workflow.reown import etcd_unreachable


@pytest.mark.parametrize("exc", [
    ConnectionFailedError("etcd down"),
    ConnectionTimeoutError("Deadline Exceeded"),
    # A run's event watch that cannot start within its 10 s (a host just back from a network cut): the multi-host
    # test's workflow owner failed its run on it instead of replaying it.
    RegistryUnavailableError("etcd at 198.18.0.1:2379 not reachable within 10 s"),
])
def test_etcd_not_answering_replays_the_run(exc: BaseException) -> None:
    assert etcd_unreachable(exc)


@pytest.mark.parametrize("exc", [PermissionDeniedError("no"), InvalidInputError("bad"), ValueError("bug")])
def test_other_errors_fail_the_run(exc: BaseException) -> None:
    assert not etcd_unreachable(exc)
