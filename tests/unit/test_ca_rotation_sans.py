"""A CA rotation re-issues the control plane's certificate with the advertised hosts it named (issue 11): a remote
client that checks the address it dialled must still accept the control plane after `activate`, not only after
its next restart."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from hivemesh.controlplane.ca import ensure_controlplane_cert, init_ca, load_ca
from hivemesh.controlplane.ca_rotation import CaRotation


def _sans(cert: x509.Certificate) -> set[str]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {*sans.get_values_for_type(x509.DNSName), *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))}


def test_the_rotated_controlplane_certificate_keeps_its_advertised_hosts(tmp_path: Path) -> None:
    files = init_ca(tmp_path, "hivemesh.local")
    # Started with --advertise: the certificate names the host (another replica's name was added before).
    ensure_controlplane_cert(load_ca(tmp_path), tmp_path, hosts=["198.18.0.1", "cp.example.net"])
    before = x509.load_pem_x509_certificate(files.controlplane_cert.read_bytes())
    old_root = load_ca(tmp_path).certificate
    assert {"198.18.0.1", "cp.example.net"} <= _sans(before)

    rotation = CaRotation(tmp_path, hosts=["198.18.0.2"])  # this replica's own advertised host
    rotation.step("prepare")
    ca = rotation.step("activate")

    after = x509.load_pem_x509_certificate(files.controlplane_cert.read_bytes())
    assert ca.certificate != old_root
    after.verify_directly_issued_by(ca.certificate)  # re-issued by the new root (raises otherwise)
    assert _sans(after) == {"controlplane.hivemesh.local", "localhost", "127.0.0.1", "198.18.0.1",
                            "cp.example.net", "198.18.0.2"}
