"""What a process runs on: the versions that set a call's cost, named by its metrics and by `hivemesh --version`.

The direct links' mutual TLS (`link_direct`) runs on the OpenSSL that Python's `ssl` module was built with: the
machine's, not grpcio's (BoringSSL, inside grpcio) nor cryptography's (its own). OpenSSL before 3.1 has no VAES
code for AES-GCM: on 6 Dec, on one 2-core AMD EPYC host, a 64 KiB call's agent spent 14% less CPU on 3.5.7 than
on 3.0.19 (BENCHMARKS.md). Two nodes of one mesh may differ so; `hivemesh_build_info` lets an operator see which
does. Read without importing grpcio (its version from the installed metadata): the CLI tells owned servers apart
before gRPC loads.
"""

from __future__ import annotations

import functools
import platform
import ssl
from importlib import metadata
from typing import Final

FAST_GCM_FROM: Final = (3, 1)
"""The first OpenSSL whose AES-GCM uses VAES and VPCLMULQDQ (openssl/openssl#17239)."""


@functools.cache  # a metadata look-up walks sys.path (~10 ms); every node's metrics registry asks for it
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def runtime() -> dict[str, str]:
    """hivemesh's version, the interpreter, grpcio's version and the OpenSSL of the direct links' TLS (the
    `hivemesh_build_info` labels)."""
    return {"version": _version("hivemesh"),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "grpcio": _version("grpcio"),
            "openssl": ssl.OPENSSL_VERSION}


def fast_gcm() -> bool:
    """Whether the links' OpenSSL has the VAES code for AES-GCM (whether the CPU has VAES is another matter)."""
    return ssl.OPENSSL_VERSION_INFO[:2] >= FAST_GCM_FROM


__all__ = ["FAST_GCM_FROM", "fast_gcm", "runtime"]
