"""The pure parts of control-plane replication: the leader's lease clock, replica address lists and adverts."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemesh.controlplane.leader import LeaseClock
from hivemesh.controlplane.server import ControlPlaneConfig
from hivemesh.mesh.controlplane_endpoints import Advert, parse_addresses
from hivemesh.mesh.settings import MeshSettings


def test_lease_clock_steps_down_before_etcd_can_expire_the_key() -> None:
    clock = LeaseClock(ttl_s=10)
    assert clock.margin_s == 2.0 and not clock.leading(0.0)
    clock.granted(sent_at=100.0)  # etcd starts the TTL when it receives the grant: no earlier than this
    assert clock.leading(107.9) and not clock.leading(108.0)  # sent + ttl - margin, strictly before
    assert clock.left(105.0) == pytest.approx(3.0)
    # A keepalive counts from when it was sent, not when its answer came back (a slow answer gains nothing).
    clock.renewed(sent_at=104.0, ttl_s=10)
    assert clock.leading(111.9) and not clock.leading(112.0)
    # An answer that says less time is left than we thought never moves the deadline back past what was granted,
    # and an old (reordered) answer never shortens it.
    clock.renewed(sent_at=101.0, ttl_s=10)
    assert clock.valid_until == pytest.approx(112.0)
    # A frozen process (SIGSTOP) wakes up past its deadline: it is not leading, whatever it last believed.
    assert not clock.leading(500.0) and clock.left(500.0) == 0.0
    # etcd says the lease is gone: step down at once.
    clock.renewed(sent_at=110.0, ttl_s=0)
    assert not clock.leading(110.0) and clock.valid_until == 0.0
    clock.granted(sent_at=200.0)
    clock.lost()
    assert not clock.leading(200.0)


def test_lease_clock_refuses_what_cannot_be_safe() -> None:
    with pytest.raises(ValueError, match=">= 2"):
        LeaseClock(ttl_s=1)
    with pytest.raises(ValueError, match="margin"):
        LeaseClock(ttl_s=3, margin_s=3)
    assert LeaseClock(ttl_s=2).margin_s == pytest.approx(0.4)


def test_address_lists_and_adverts() -> None:
    assert parse_addresses(" a:1, b:2 ,a:1,,[::1]:3") == ("a:1", "b:2", "[::1]:3")
    for bad, said in (("a", "'a' must be host:port"), ("a:1,b:x", "'b:x'"), (":1", "':1'"), ("h:0", "'h:0'"),
                      (" , ", "no control plane address")):
        with pytest.raises(ValueError, match=said):
            parse_addresses(bad)
    ad = Advert("cp-1", "10.0.0.1:7000", "10.0.0.1:7001")
    assert Advert.from_json(ad.to_json()) == ad
    for junk in (b"", b"{}", b"[1]", b'{"replica": "x", "controlplane": "nope", "join": "h:1"}'):
        assert Advert.from_json(junk) is None
    # Settings take several replicas, and say which address is wrong.
    s = MeshSettings(etcd="127.0.0.1:2379", controlplane="h1:1,h2:2", join="h1:3,h2:4", ca_bundle="ca.pem")  # type: ignore[arg-type]
    assert s.controlplane == "h1:1,h2:2"
    with pytest.raises(ValueError, match="join address 'h2' must be host:port"):
        MeshSettings(etcd="127.0.0.1:2379", controlplane="h1:1", join="h1:3,h2", ca_bundle="ca.pem")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"leader_ttl_s must be 2\.\.300"):
        ControlPlaneConfig(etcd_endpoints="127.0.0.1:2379", certs_dir="c", state_dir="s", leader_ttl_s=1)  # type: ignore[arg-type]


def test_shared_keys_mirror_into_a_replicas_state_folder(tmp_path: Path) -> None:
    from hivemesh.controlplane import shared_keys
    from hivemesh.controlplane.issuer import SigningKeys
    from hivemesh.mesh.errors import FailedPreconditionError

    first = SigningKeys.load_or_create(tmp_path / "a")
    pending = first.rotate(60)
    doc = shared_keys.document(first)
    assert set(doc) == {k.kid for k in first.every} and all("PRIVATE KEY" in e["pem"] for e in doc.values())
    other = shared_keys.mirror(doc, tmp_path / "b")  # what another replica holds: the same keys and schedule
    assert [(k.kid, k.activates_at) for k in other.every] == [(k.kid, k.activates_at) for k in first.every]
    assert other.active.kid == first.active.kid != pending.kid
    files = sorted((tmp_path / "b" / "keys").glob("es256-*.pem"))
    assert len(files) == 2 and all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    # A key retired from the document leaves the folder too.
    fewer = shared_keys.mirror({pending.kid: doc[pending.kid]}, tmp_path / "b")
    assert [k.kid for k in fewer.every] == [pending.kid]
    assert len(list((tmp_path / "b" / "keys").glob("es256-*.pem"))) == 1
    for junk in (b"", b"{}", b'{"keys": []}', b'{"keys": [{"pem": "x"}]}'):
        with pytest.raises(FailedPreconditionError, match="unreadable"):
            shared_keys._parse(junk)
