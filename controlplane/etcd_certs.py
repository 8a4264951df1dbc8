"""Certificates for the embedded etcd, issued by the mesh CA: the member's server (and peer) certificate and the
bootstrap identity (Common Name `root`) that creates etcd's users and roles.

The mesh CA and not a CA of etcd's own, so that there is one trust anchor: etcd accepts exactly the
certificates the mesh issues (its `--trusted-ca-file` is the mesh bundle, `ca.pem`), a workload verifies etcd
with the bundle it already holds, and a workload certificate's Common Name (`<kind>:<name>`) is its etcd user.
Neither certificate carries a mesh identity (`spiffe://<td>/etcd*` is no agent, client or operator), so
neither can be used to call the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from hivemesh.controlplane.ca import CaFiles, CertificateAuthority, _write_atomic
from hivemesh.mesh.advertise import san_entries
from hivemesh.mesh.etcd import EtcdServerTls, EtcdTls
from hivemesh.mesh.etcd_roles import ROOT_USER
from hivemesh.mesh.pki import SCHEME

ETCD_TTL_S: Final = 365 * 86400


@dataclass(frozen=True)
class EtcdCertFiles:
    """Where `issue_etcd_certs` put the member's and the bootstrap identity's files (keys 0600)."""

    server_cert: Path
    server_key: Path
    root_cert: Path
    root_key: Path

    @classmethod
    def in_dir(cls, d: Path) -> EtcdCertFiles:
        return cls(d / "etcd.pem", d / "etcd.key", d / "etcd-root.pem", d / "etcd-root.key")


def issue_etcd_certs(
    ca: CertificateAuthority, certs_dir: Path, *, host: str = "127.0.0.1", out_dir: Path | None = None,
    hosts: Sequence[str] = (),
) -> EtcdServerTls:
    """Issue (or re-issue) the member's certificate for host and the root identity, next to the CA.

    hosts adds the advertised address of every member that shares this certificate: clients given several
    endpoints check each member against one name, and a member checks its peers' certificates against the
    address they connect from, so a cluster's certificate names all of them (DNS names and IPs).
    Returns the member's TLS configuration: its certificate, the mesh bundle as the CAs it trusts (a client
    certificate from any mesh root is accepted; etcd's roles decide what it may do), and the root identity.
    """
    files = EtcdCertFiles.in_dir(out_dir or certs_dir)
    td = ca.trust_domain
    extra_dns, extra_ips = san_entries([host, *hosts])
    ips = ["127.0.0.1", *(ip for ip in extra_ips if ip != "127.0.0.1")]
    dns = ["localhost", f"etcd.{td}", *(name for name in extra_dns if name != "localhost")]
    cert, key = ca.issue_with_new_key(f"{SCHEME}{td}/etcd", common_name="etcd", dns_names=dns, ips=ips,
                                      ttl_s=ETCD_TTL_S)
    root_cert, root_key = ca.issue_with_new_key(f"{SCHEME}{td}/etcd-root", common_name=ROOT_USER,
                                                dns_names=[], ttl_s=ETCD_TTL_S)
    for path, data, mode in ((files.server_key, key, 0o600), (files.root_key, root_key, 0o600),
                             (files.server_cert, cert, 0o644), (files.root_cert, root_cert, 0o644)):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(path, data, mode)
    return EtcdServerTls(
        cert_file=files.server_cert, key_file=files.server_key, trusted_ca_file=CaFiles.in_dir(certs_dir).ca_cert,
        admin_cert_file=files.root_cert, admin_key_file=files.root_key,
    )


def controlplane_etcd_tls(certs_dir: Path, etcd_ca: Path | None = None) -> EtcdTls:
    """The control plane's etcd identity: its own certificate (Common Name `controlplane`, etcd's root role),
    verifying etcd against etcd_ca or else the mesh bundle."""
    files = CaFiles.in_dir(certs_dir)
    return EtcdTls.from_files(etcd_ca or files.ca_cert, files.controlplane_cert, files.controlplane_key)
