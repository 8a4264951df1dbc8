"""gRPC TLS plumbing for workloads: credentials, channels pinned to a peer identity, and joining the mesh.

A client never dials by the certificate's host name; it sets `grpc.ssl_target_name_override` to the peer's
DNS SAN (`<name>.<kind>.<td>` or `controlplane.<td>`), so gRPC's own hostname check proves it reached the
identity it meant to reach, whatever address it dialled.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from cryptography.hazmat.primitives import serialization

from hivemesh.mesh.controlplane_endpoints import parse_addresses
from hivemesh.mesh.controlplane_errors import UNREACHABLE, rpc_failure
from hivemesh.mesh.errors import HivemeshError, InvalidInputError
from hivemesh.mesh.files import write_synced
from hivemesh.mesh.pki import (
    SpiffeId,
    cert_expiry,
    cert_thumbprint_s256,
    controlplane_dns_name,
    load_cert,
    new_key_and_csr,
    parse_spiffe_id,
    spiffe_id_of,
    trust_domain_of_bundle,
    validate_name,
)
from hivemesh.v1 import control_pb2, control_pb2_grpc

MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
SERVER_MIN_PING_INTERVAL_MS: Final = 20_000
"""How often every mesh server lets a client ping a connection whose calls send no data (`SERVER_PING_OPTIONS`).
gRPC's default is once per 5 min: each ping sooner is a strike, and the third ends the connection with GOAWAY
ENHANCE_YOUR_CALM "too_many_pings", failing its calls UNAVAILABLE. Mesh channels ping every 30 s, so with the
default `hivemesh up` logged a GOAWAY for every agent it had called, and an idle Agent.Link, a state watch or a
slow agent's answer was cut after ~90 s."""
KEEPALIVE_TIME_MS: Final = 30_000
"""How often a mesh channel pings a connection with calls open (none without: gRPC's default), to find within
~40 s (with `grpc.keepalive_timeout_ms`) a peer that vanished without closing it; half again the servers'
minimum, for a ping that arrives late after one that arrived early. Data sent to a dead peer fails within the
keepalive timeout as well: gRPC makes it the socket's TCP_USER_TIMEOUT."""
SERVER_PING_OPTIONS: Final = (("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),)
"""For every mesh server (`hivemesh.mesh.server.ManagedServer`, the control plane's): what its clients' keepalive
needs."""
_KEEPALIVE_OPTIONS: Final = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)
STREAM_WINDOW_BYTES: Final = 1024 * 1024
"""How much of one HTTP/2 stream's data a mesh peer takes before the sender waits for a WINDOW_UPDATE
(`grpc.http2.lookahead_bytes`; gRPC's default is 64 KiB). A Link carries many calls on one stream, so with the
default, a few large calls in flight fill the window and each further message waits a round trip. Measured with
bench/mesh_cost.py (path l, links with batches, 3 interleaved rounds, only this option toggled): at 16 in flight,
0.78x the CPU per call at 64 KiB and 0.75x at 200 B, and p50 one at a time 1.15x direct instead of 1.54x at 64 KiB.
Unary calls (a stream each) showed no difference beyond the noise."""
STREAM_WINDOW_OPTIONS: Final = (("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),)
"""For every mesh channel (`channel_options`) and mesh server (`hivemesh.mesh.server.ManagedServer`)."""


def server_credentials(
    cert_pem: bytes, key_pem: bytes, bundle_pem: bytes, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """Server TLS credentials; with require_client_auth, a client certificate chaining to bundle_pem is
    mandatory (mutual TLS), otherwise the server only proves itself (the join port)."""
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=bundle_pem if require_client_auth else None,
        require_client_auth=require_client_auth,
    )


KeyMaterial = tuple[bytes, bytes, bytes | None]
"""(certificate chain PEM, private key PEM, trust bundle PEM or None for no client certificates)."""


def renewing_server_credentials(
    current: Callable[[], KeyMaterial], *, require_client_auth: bool
) -> grpc.ServerCredentials:
    """Server credentials that follow current() (certificate renewal, CA rotation) for new handshakes.

    gRPC calls the fetcher at every handshake. It answers None ("no change") unless the key material really
    changed: answering a new configuration every time makes gRPC rebuild its TLS context per handshake, and
    under a burst of connections (thousands of connect-and-hang-up) that corrupts the process heap in grpcio
    1.85's asyncio server (measured: a crash after ~7,000 connections; with this, none in 420,000).
    """
    lock = threading.Lock()
    first = current()
    last = [first]

    def config(material: KeyMaterial) -> Any:
        cert, key, bundle = material
        return grpc.ssl_server_certificate_configuration([(key, cert)], bundle)

    def fetch() -> Any:
        material = current()
        with lock:
            if material == last[0]:
                return None
            last[0] = material
        return config(material)

    return grpc.dynamic_ssl_server_credentials(
        config(first), fetch, require_client_authentication=require_client_auth
    )


def channel_credentials(
    bundle_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> grpc.ChannelCredentials:
    """Client TLS credentials trusting bundle_pem; with cert and key, the client proves itself too."""
    if (cert_pem is None) != (key_pem is None):
        raise ValueError("give both cert_pem and key_pem, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=bundle_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def channel_options(
    server_name: str | None = None,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    extra: tuple[tuple[str, Any], ...] = (),
) -> list[tuple[str, Any]]:
    """The channel options hivemesh uses everywhere (name override, keepalive, message size, stream window)."""
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *_KEEPALIVE_OPTIONS,
        *STREAM_WINDOW_OPTIONS,
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    opts.extend(extra)
    return opts


def secure_channel(
    address: str,
    creds: grpc.ChannelCredentials,
    *,
    server_name: str | None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    options: tuple[tuple[str, Any], ...] = (),
    interceptors: Any = None,
) -> grpc.aio.Channel:
    """A grpc.aio secure channel to address whose TLS peer must present server_name as a DNS SAN."""
    return grpc.aio.secure_channel(
        address,
        creds,
        options=channel_options(server_name, max_message_bytes=max_message_bytes, extra=options),
        interceptors=interceptors,
    )


@dataclass(frozen=True)
class Workload:
    """A workload's mesh identity: its key, its certificate and the trust bundle it verifies peers with."""

    spiffe_id: str
    key_pem: bytes
    cert_pem: bytes
    bundle_pem: bytes
    expires_at: float

    @classmethod
    def from_pems(cls, cert_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> Workload:
        """Build and check a Workload: the key must belong to the certificate, which names one SPIFFE id."""
        cert = load_cert(cert_pem)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a valid unencrypted PEM private key: {exc}") from None
        pub = key.public_key()
        fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if pub.public_bytes(*fmt) != cert.public_key().public_bytes(*fmt):
            raise ValueError("the private key does not belong to the certificate")
        trust_domain_of_bundle(bundle_pem)  # proves the bundle parses and names a trust domain
        return cls(
            spiffe_id=spiffe_id_of(cert),
            key_pem=key_pem,
            cert_pem=cert_pem,
            bundle_pem=bundle_pem,
            expires_at=cert_expiry(cert),
        )

    @functools.cached_property
    def identity(self) -> SpiffeId:
        return parse_spiffe_id(self.spiffe_id)

    @functools.cached_property
    def thumbprint(self) -> str:
        """x5t#S256 of this workload's certificate (what its tokens are bound to)."""
        return cert_thumbprint_s256(self.cert_pem)

    @functools.cached_property
    def trust_domain(self) -> str:
        return trust_domain_of_bundle(self.bundle_pem)

    def server_credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        return server_credentials(
            self.cert_pem, self.key_pem, self.bundle_pem, require_client_auth=require_client_auth
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.bundle_pem, self.cert_pem, self.key_pem)

    def save(self, cert_path: Path, key_path: Path, bundle_path: Path) -> None:
        """Write the three files (key 0600) as one change, so a failure part-way never leaves a key beside a
        certificate it does not belong to (the identity would be lost: the next start needs a join token).

        Each new file is first written whole and synced beside the old one; a failure then (a full disk) removes
        them and leaves the old identity as it was. Only then, under a marker naming them, are they renamed into
        place; a crash among the renames is finished by `finish_save` before the next read."""
        staged = [(Path(path), data, mode) for path, data, mode in (
            (key_path, self.key_pem, 0o600), (cert_path, self.cert_pem, 0o644), (bundle_path, self.bundle_pem, 0o644))]
        if len({path.parent for path, _, _ in staged}) != 1:
            raise ValueError("the three files of an identity are kept in one folder")
        written: list[Path] = []
        try:
            for path, data, mode in staged:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = _staged(path)
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                written.append(tmp)
                write_synced(tmp, data, mode)
            marker = _marker(Path(key_path))
            write_synced(marker, "\n".join(path.name for path, _, _ in staged).encode(), 0o600)
        except BaseException:
            for tmp in written:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise
        finish_save(Path(key_path))


def _staged(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _marker(key_path: Path) -> Path:
    return key_path.with_name(".identity-commit")


def save_pending(key_path: Path) -> bool:
    """Whether a save beside key_path was cut short (`finish_save` settles it)."""
    return _marker(key_path).exists()


def finish_save(key_path: Path) -> None:
    """Settle a `Workload.save` beside key_path: with its marker present, every staged file was written whole,
    so each still staged is renamed into place; then the marker goes. Idempotent."""
    marker = _marker(key_path)
    try:
        targets = [marker.parent / name for name in marker.read_text().splitlines() if name]
    except FileNotFoundError:
        return
    for path in targets:
        with contextlib.suppress(FileNotFoundError):  # renamed already, before a crash
            os.replace(_staged(path), path)
    dir_fd = os.open(marker.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the renames are durable before the marker that would redo them goes
    finally:
        os.close(dir_fd)
    marker.unlink()


def load_workload_files(cert_path: Path | str, key_path: Path | str, bundle_path: Path | str) -> Workload:
    """Load a Workload from PEM files (ValueError when they do not belong together)."""
    return Workload.from_pems(
        Path(cert_path).read_bytes(), Path(key_path).read_bytes(), Path(bundle_path).read_bytes()
    )


async def join(
    join_address: str,
    ca_bundle_pem: bytes,
    join_token: str,
    name: str,
    kind: str = "agent",
    *,
    trust_domain: str | None = None,
    timeout_s: float = 10.0,
) -> Workload:
    """Join the mesh: a new key and CSR, signed by the control plane's Join service for a one-time token.

    The control plane is verified over server-authenticated TLS as `controlplane.<td>` (td from the
    bundle unless given). Raises the control plane's typed error (e.g. JoinTokenInvalidError).
    """
    try:
        validate_name(name)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    td = trust_domain or trust_domain_of_bundle(ca_bundle_pem)
    key_pem, csr_pem = new_key_and_csr(f"spiffe://{td}/{kind}/{name}")
    creds = channel_credentials(ca_bundle_pem)
    addresses = parse_addresses(join_address, "join")  # several replicas: the next one while one is unreachable
    each_s = timeout_s if len(addresses) == 1 else max(1.0, timeout_s / len(addresses))
    for i, address in enumerate(addresses):
        async with secure_channel(address, creds, server_name=controlplane_dns_name(td)) as channel:
            stub = control_pb2_grpc.JoinStub(channel)
            try:
                resp = await stub.SignCertificate(
                    control_pb2.SignCertificateRequest(csr_pem=csr_pem, join_token=join_token, name=name),
                    timeout=each_s,
                )
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in UNREACHABLE or i + 1 == len(addresses):
                    raise rpc_failure(exc, address, timeout_s=each_s) from exc
    try:
        workload = Workload.from_pems(resp.certificate_pem, key_pem, resp.ca_bundle_pem or ca_bundle_pem)
    except ValueError as exc:
        raise HivemeshError(f"the control plane returned an unusable certificate: {exc}") from None
    return workload
