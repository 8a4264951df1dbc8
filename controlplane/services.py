"""The control plane's feature services, in one list: each is installed on the mTLS server at start.

An installer is `install(core, server)`: it adds its servicer to `server` (a grpc.aio.Server) and may use
`core` (config, CA, token issuer, etcd client, `core.peer(context)` for the caller's identity). Add a feature
by appending its installer here; the control plane serves them all behind the same mutual TLS. An installer may
return a `Feature` (async start/stop): it is started before the ports serve and stopped after they close.

`interceptors()` lists factories `make(core)` of server interceptors put on both control-plane servers (they
must exist before the servers are built): the audit of every control-plane decision is one, and the decode guard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import grpc

from hivemesh.mesh.decode_guard import DecodeGuard

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core


class Feature(Protocol):
    """Background work of a feature service, run for the control plane's lifetime."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ServiceInstaller = Callable[["Core", grpc.aio.Server], "Feature | None"]
InterceptorFactory = Callable[["Core"], grpc.aio.ServerInterceptor]


def _decode_guard(core: Core) -> grpc.aio.ServerInterceptor:
    """The mesh's `DecodeGuard` (it needs nothing of the core)."""
    return DecodeGuard()


def interceptors() -> list[InterceptorFactory]:
    """Interceptor factories for both control-plane servers, outermost first. The audit comes before the decode
    guard, so that a request refused for not decoding is on record like every other refusal; every interceptor
    after the guard (and the services) sees only decoded requests."""
    from hivemesh.controlplane import (
        audit,  # the audit of every control-plane decision (issue 4)
        trust_service,  # revoked subjects get no new token, delegation or certificate (issue 4)
    )

    return [audit.interceptor, _decode_guard, trust_service.interceptor]


def installers() -> list[ServiceInstaller]:
    """Every feature service's installer, in registration order."""
    from hivemesh.controlplane import (
        audit,  # audit log: shipping, query, verify, checkpoints (issue 4)
        escalation_webhooks,  # webhooks that tell people about escalations (issue 15)
        escalations,  # human escalation queue (issue 5)
        policy_service,  # traffic policies and status (issue 3)
        retention,  # etcd compaction, deletion of finished runs and resolved escalations (issue 10)
        rollouts,  # automatic canary rollouts, run by the leader (issue 15)
        state_service,  # shared state and conversation memory per namespace (issue 15)
        trust_service,  # delegation, revocation, key and CA rotation (issue 4)
    )

    return [escalations.install, escalation_webhooks.install, audit.install, policy_service.install,
            trust_service.install, retention.install, state_service.install, rollouts.install]
