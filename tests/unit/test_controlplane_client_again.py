"""A control-plane replica whose etcd request failed (REGISTRY_UNAVAILABLE) is asked once more within the call's
time: the leader-host cut of the multi-host test ended a token request that way when the only other replica was
the cut one (docs/multihost.md).

The replica here is a real gRPC server over mutual TLS on 127.0.0.1 that answers the first IssueToken the way
the control plane answers when a member it asked was cut off, and the next one with a token.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.ca import init_ca
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import RegistryUnavailableError, abort
from hivemesh.v1 import control_pb2, control_pb2_grpc
from tests.support.controlplane_replica import serving_replica


class _EtcdFailsFirst(control_pb2_grpc.ControlPlaneServicer):
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def IssueToken(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            await abort(context, RegistryUnavailableError("the registry (etcd) failed: ConnectionFailedError"))
        return control_pb2.IssueTokenResponse(token="t", scopes=list(request.scopes))


@pytest.mark.timeout(30)
async def test_a_replica_whose_etcd_failed_is_asked_once_more(tmp_path: Path) -> None:
    init_ca(tmp_path, "hivemesh.local")
    once, always = _EtcdFailsFirst(1), _EtcdFailsFirst(100)
    async with serving_replica(tmp_path, once) as a1, serving_replica(tmp_path, always) as a2:
        cp = ControlPlaneClient.from_certs_dir(a1, tmp_path)
        cp.timeout_s = 4.0
        async with cp:
            assert (await cp.issue_token("spiffe://hivemesh.local/agent/echo", ["echo"])).token == "t"
            assert once.calls == 2 and cp.address == a1 and cp.reachable

        # Once only, within the call's time: a replica whose etcd keeps failing ends the call with that error.
        cp = ControlPlaneClient.from_certs_dir(a2, tmp_path)
        async with cp:
            began = asyncio.get_running_loop().time()
            with pytest.raises(RegistryUnavailableError):
                await cp.issue_token("spiffe://hivemesh.local/agent/echo", ["echo"])
            assert always.calls == 2 and asyncio.get_running_loop().time() - began < 2.0
