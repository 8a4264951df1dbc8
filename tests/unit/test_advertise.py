"""Bind versus advertise: what every listening component tells others, and the SANs its certificate carries."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from hivemesh.controlplane.ca import CaFiles, ensure_controlplane_cert, init_ca, load_ca
from hivemesh.controlplane.cli.app import cli
from hivemesh.controlplane.etcd_certs import issue_etcd_certs
from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
from hivemesh.mesh.advertise import advertised_host, peer_ip, san_entries
from hivemesh.mesh.etcd import EtcdServer, initial_cluster
from hivemesh.mesh.pki import new_key_and_csr
from hivemesh.mesh.settings import MeshSettings
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk.serve import AgentServerConfig

TD = "hivemesh.local"


def _sans(pem: bytes) -> tuple[set[str], set[str]]:
    ext = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)), {str(i) for i in ext.get_values_for_type(x509.IPAddress)}


def test_wildcards_are_never_advertised_and_the_message_says_what_to_give() -> None:
    assert advertised_host("0.0.0.0", "198.18.0.2") == "198.18.0.2"
    assert advertised_host("127.0.0.1", None) == "127.0.0.1"
    for bad in ("0.0.0.0", "::", "[::]", ""):
        with pytest.raises(ValueError, match=r"wildcard.*--advertise"):
            advertised_host(bad, None)
    with pytest.raises(ValueError, match="wildcard"):
        advertised_host("10.0.0.5", "0.0.0.0")
    with pytest.raises(ValueError, match="without a port"):
        advertised_host("0.0.0.0", "198.18.0.2:7443")
    assert san_entries(["198.18.0.1", "etcd-0.etcd", "0.0.0.0", "[::1]", "198.18.0.1"]) == (
        ["etcd-0.etcd"], ["198.18.0.1", "::1"])


def test_each_component_binds_one_address_and_advertises_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SDK agent: the environment sets both, as a container's manifest would.
    monkeypatch.setenv("HIVEMESH_LISTEN", "0.0.0.0")
    monkeypatch.setenv("HIVEMESH_ADVERTISE", "198.18.0.2")
    cfg = AgentServerConfig()
    assert (cfg.host, cfg.advertise) == ("0.0.0.0", "198.18.0.2")
    monkeypatch.delenv("HIVEMESH_ADVERTISE")
    with pytest.raises(ValueError, match="wildcard"):
        AgentServerConfig()
    monkeypatch.delenv("HIVEMESH_LISTEN")
    assert AgentServerConfig().host == "127.0.0.1"

    # Sidecar: the registry endpoint is the advertised host with the bound port.
    where = MeshSettings(etcd="127.0.0.1:2379", controlplane="127.0.0.1:1", join="127.0.0.1:2", ca_bundle=tmp_path)
    sidecar = Sidecar(SidecarConfig(agent="127.0.0.1:7001", listen="0.0.0.0:0", advertise="198.18.0.3"), where)
    sidecar.port = 7443
    assert sidecar.endpoint == "198.18.0.3:7443"
    with pytest.raises(ValueError, match="wildcard"):
        SidecarConfig(agent="127.0.0.1:7001", listen="0.0.0.0:0")

    # Control plane: printed addresses are the advertised ones.
    base = {"etcd_endpoints": "127.0.0.1:2379", "certs_dir": tmp_path, "state_dir": tmp_path}
    server = ControlPlaneServer(ControlPlaneConfig(**base, host="0.0.0.0", advertise="198.18.0.1"))  # type: ignore[arg-type]
    server.port, server.join_port = 7443, 7444
    assert (server.address, server.join_address) == ("198.18.0.1:7443", "198.18.0.1:7444")
    with pytest.raises(ValueError, match="wildcard"):
        ControlPlaneConfig(**base, host="0.0.0.0")  # type: ignore[arg-type]

    # etcd: listen URLs on the bind address, advertised and cluster URLs on the host's own.
    members = [EtcdServer(data_dir=tmp_path / f"m{i}", name=f"m{i}", host=f"198.18.0.{i}", listen_host="0.0.0.0",
                          client_port=2379, peer_port=2380) for i in (1, 2)]
    members[0].initial_cluster = initial_cluster(members)
    argv = members[0].command("etcd")
    flags = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert flags["--listen-client-urls"] == "http://0.0.0.0:2379"
    assert flags["--advertise-client-urls"] == "http://198.18.0.1:2379"
    assert flags["--listen-peer-urls"] == "http://0.0.0.0:2380"
    assert flags["--initial-advertise-peer-urls"] == "http://198.18.0.1:2380"
    assert flags["--initial-cluster"] == "m1=http://198.18.0.1:2380,m2=http://198.18.0.2:2380"
    with pytest.raises(ValueError, match="wildcard"):
        EtcdServer(data_dir=tmp_path, host="0.0.0.0", client_port=1, peer_port=2).command("etcd")


def test_certificates_name_the_advertised_hosts(tmp_path: Path) -> None:
    files: CaFiles = init_ca(tmp_path / "certs", TD)
    ca = load_ca(files.certs_dir)
    tls = issue_etcd_certs(ca, files.certs_dir, hosts=["198.18.0.1", "198.18.0.2", "etcd-2.etcd"])
    dns, ips = _sans(tls.cert_file.read_bytes())
    assert {"localhost", f"etcd.{TD}", "etcd-2.etcd"} <= dns
    assert {"127.0.0.1", "198.18.0.1", "198.18.0.2"} <= ips

    # The control plane's certificate is re-issued when it lacks an advertised host, and only then.
    assert "198.18.0.1" not in _sans(files.controlplane_cert.read_bytes())[1]
    ensure_controlplane_cert(ca, files.certs_dir, hosts=["198.18.0.1", "cp.example"])
    first = files.controlplane_cert.read_bytes()
    dns, ips = _sans(first)
    assert "cp.example" in dns and ipaddress.ip_address("198.18.0.1") in {ipaddress.ip_address(i) for i in ips}
    ensure_controlplane_cert(ca, files.certs_dir, hosts=["198.18.0.1"])
    assert files.controlplane_cert.read_bytes() == first


def test_a_workload_certificate_names_the_ip_its_request_came_from(tmp_path: Path) -> None:
    assert peer_ip("ipv4:198.18.0.2:50412") == "198.18.0.2"
    assert peer_ip("ipv6:[fd00::2]:50412") == "fd00::2"
    assert peer_ip("ipv6:[::ffff:198.18.0.3]:1") == "198.18.0.3"
    for local in ("ipv4:127.0.0.1:1", "ipv6:[::1]:1", "unix:/run/x.sock", "ipv4:0.0.0.0:1", ""):
        assert peer_ip(local) is None, local
    ca = load_ca(init_ca(tmp_path / "certs", TD).certs_dir)
    _, csr = new_key_and_csr(f"spiffe://{TD}/agent/echo")
    dns, ips = _sans(ca.sign_csr(csr, f"spiffe://{TD}/agent/echo", ips=["198.18.0.2"]))
    assert dns == {f"echo.agent.{TD}", "localhost"} and ips == {"198.18.0.2"}


def test_cli_refuses_a_wildcard_advertise_with_the_fix(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "sidecar", "--agent", "127.0.0.1:7001",
                                      "--listen", "0.0.0.0:0"])
    assert result.exit_code != 0
    assert "wildcard" in result.output and "--advertise" in result.output
