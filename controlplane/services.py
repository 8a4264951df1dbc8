"""The control plane's feature services, in one list: each is installed on the mTLS server at start.

An installer is `install(core, server)`: it adds its servicer to `server` (a grpc.aio.Server) and may use
`core` (config, CA, token issuer, etcd client, `core.peer(context)` for the caller's identity). Add a feature
by appending its installer here; the control plane serves them all behind the same mutual TLS.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from hivemesh.controlplane.server import Core

ServiceInstaller = Callable[["Core", grpc.aio.Server], None]


def installers() -> list[ServiceInstaller]:
    """Every feature service's installer, in registration order."""
    return []
