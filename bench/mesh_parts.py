"""The mesh's own per-call work, piece by piece, in one process with no network: what the layers cost next to
the ~200-450 µs of CPU that gRPC spends on every process a call passes through (see mesh_cost.py).

    .venv/bin/python bench/mesh_parts.py            # ~15 s

Uses the real layers (a real CA certificate for the peer, a real ES256 token from the issuer's keys), called
directly, so each figure is the pure CPU cost of that step on the hot path.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.controlplane.issuer import SigningKeys, TokenIssuer
from hivemesh.mesh import json_fast
from hivemesh.mesh.inbound import build_inbound_chain
from hivemesh.mesh.json_compact import compact_json
from hivemesh.mesh.layers import Inbound
from hivemesh.mesh.outbound import encode_request
from hivemesh.mesh.pki import cert_thumbprint_s256, controlplane_id
from hivemesh.mesh.tokens import KeySet, TokenVerifier
from hivemesh.v1 import agent_pb2

TD = "hivemesh.local"
AGENT = f"spiffe://{TD}/agent/bench"
CALLER = f"spiffe://{TD}/client/bench-client"
SCHEMA = json.dumps(
    {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"], "additionalProperties": False}
)


def per_call_us(fn: Callable[[], Any], *, min_s: float = 0.4, max_calls: int = 200_000) -> float:
    """Median of 5 timed batches, in µs per call (batch size tuned to take ~min_s/5)."""
    for _ in range(100):
        fn()
    n = 1
    while n < max_calls:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_s / 5:
            break
        n *= 2
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(runs)[2]


def _authz_kwargs() -> dict[str, Any]:
    """An authz table allowing the bench caller, for trees whose chain has the (default-deny) authz layer."""
    if "authz" not in inspect.signature(build_inbound_chain).parameters:
        return {}
    from hivemesh.mesh.authz import AUTHZ, compile_authz
    from hivemesh.mesh.policy import PolicyDoc

    doc = PolicyDoc("authz", "bench", {"rules": [{"name": "bench", "action": "ALLOW", "from": {"callers": [CALLER]},
                                                  "to": {"capabilities": ["echo"]}}]})
    AUTHZ.validate(doc)
    table = compile_authz({"bench": doc})
    return {"authz": lambda: table}


def audit_row(rows: list[tuple[str, str, float]], tmp: Path, chain: Any, *, raw_200: bytes,
              metadata: dict[str, str], auth: dict[str, Any]) -> None:
    """One audit record per inbound decision, as the interceptor's observer writes it (if this tree has one)."""
    try:
        import grpc

        from hivemesh.mesh.audit import AuditLog
    except ImportError:
        return
    audit = AuditLog.open(tmp / "audit", node=AGENT, instance="bench-1")
    call = Inbound(method="Invoke", request=agent_pb2.InvokeRequest.FromString(raw_200), wire_size=len(raw_200),
                   metadata=metadata, auth_context=auth)
    chain.admit(call)
    try:
        rows.append(("audit record (fields, canonical JSON, SHA-256 chain, write)", "-",
                     per_call_us(lambda: audit(call, None, grpc.StatusCode.OK, 0.0005))))
    finally:
        audit.spool.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="hivemesh-parts-") as tmp_dir:
        measure(Path(tmp_dir))


def measure(tmp: Path) -> None:
    init_ca(tmp / "certs", TD)
    cert_pem, _ = load_ca(tmp / "certs").issue_with_new_key(
        CALLER, common_name="bench-client", dns_names=[f"bench-client.client.{TD}"], ttl_s=3600
    )
    keys = SigningKeys.load_or_create(tmp / "state")
    keyset = KeySet()
    keyset.update_from_jwks(keys.jwks_json())
    thumb = cert_thumbprint_s256(cert_pem)
    token = TokenIssuer(keys, TD).issue(CALLER, AGENT, ["echo"], cnf_thumbprint=thumb).token
    verifier = TokenVerifier(keyset, issuer=controlplane_id(TD), audience=AGENT)
    chain = build_inbound_chain(
        trust_domain=TD, verifier=verifier, capabilities=[agent_pb2.Capability(name="echo", input_schema=SCHEMA)],
        agent_name="bench", **_authz_kwargs(),
    )
    auth = {"x509_pem_cert": [cert_pem], "transport_security_type": [b"ssl"]}
    metadata = {"authorization": f"Bearer {token}", "user-agent": "grpc-python-asyncio/1.85.1"}

    rows: list[tuple[str, str, float]] = []

    def row(what: str, size: str, fn: Callable[[], Any]) -> None:
        rows.append((what, size, per_call_us(fn)))

    uncached = TokenVerifier(keyset, issuer=controlplane_id(TD), audience=AGENT, cache_size=1)

    def verify_uncached() -> None:
        uncached.clear_cache()
        uncached.verify(token, capability="echo", peer_thumbprint=thumb)

    row("token check, cache hit", "", lambda: verifier.verify(token, capability="echo", peer_thumbprint=thumb))
    row("token check, full ES256 verify (cache miss)", "", verify_uncached)
    for size in (200, 64 * 1024):
        label = f"{size} B" if size < 1024 else f"{size // 1024} KiB"
        payload = {"text": "x" * (size - 11)}
        ctx = agent_pb2.CallContext(call_id=uuid.uuid4().hex)
        raw = encode_request("echo", compact_json(payload), context=ctx)

        def edge() -> bytes:
            data = compact_json(payload)  # noqa: B023 - bound per size on purpose
            c = agent_pb2.CallContext(call_id=uuid.uuid4().hex)
            return encode_request("echo", data, context=c)

        def admit() -> None:
            req = agent_pb2.InvokeRequest.FromString(raw)  # noqa: B023
            chain.admit(Inbound(method="Invoke", request=req, wire_size=len(raw), metadata=metadata,  # noqa: B023
                                auth_context=auth))

        def decode_only() -> None:
            agent_pb2.InvokeRequest.FromString(raw)  # noqa: B023

        row("caller: JSON-encode input + CallContext + encode InvokeRequest", label, edge)
        row("  of which JSON encode", label, lambda: compact_json(payload))  # noqa: B023
        row("callee: decode InvokeRequest + whole inbound chain", label, admit)
        row("  of which decode InvokeRequest", label, decode_only)
        call = Inbound(method="Invoke", request=agent_pb2.InvokeRequest.FromString(raw), wire_size=len(raw),
                       metadata=metadata, auth_context=auth)
        for layer in chain.layers:  # each layer alone, on a call the layers before it have already filled in
            row(f"  of which layer {layer.name}", label, functools.partial(layer.check, call))
            layer.check(call)
        text = compact_json(payload)
        row("    (JSON parse of the input alone)", label, lambda: json_fast.loads(text))  # noqa: B023
    audit_row(rows, tmp, chain, raw_200=encode_request("echo", b'{"text":"x"}'), metadata=metadata, auth=auth)
    width = max(len(w) for w, _, _ in rows)
    sys.stdout.write(f"| {'step'.ljust(width)} | payload | µs per call |\n|---|---|---|\n")
    for what, where, us in rows:
        sys.stdout.write(f"| {what.ljust(width)} | {where or '-'} | {us:,.2f} |\n")


if __name__ == "__main__":
    main()
