"""`hivemesh --version`: the package's version and the runtime its calls' cost depends on (`mesh/build_info.py`)."""

from __future__ import annotations

from hivemesh.mesh import build_info


def version_text() -> str:
    """Three lines: hivemesh's version (click's usual first line), the interpreter and grpcio, and the OpenSSL of
    the direct links' TLS, with a note when it predates `build_info.FAST_GCM_FROM`."""
    info = build_info.runtime()
    tls = info["openssl"]
    if not build_info.fast_gcm():
        major, minor = build_info.FAST_GCM_FROM
        tls += (f" (older than {major}.{minor}: no VAES code for AES-GCM, so on a CPU with VAES the links' TLS "
                "runs slower; README, \"The TLS library\")")
    return (f"hivemesh, version {info['version']}\n"
            f"{info['python']}, grpcio {info['grpcio']}\n"
            f"TLS of the direct links: {tls}")
