"""Which PrefixCaches may share one etcd connection (watch_channel.channel_key): never two identities."""

from __future__ import annotations

from hivemesh.mesh.etcd import EtcdAccess, EtcdTls
from hivemesh.mesh.watch_channel import channel_key

ALICE = EtcdTls(b"ca", b"alice-cert", b"alice-key")
BOB = EtcdTls(b"ca", b"bob-cert", b"bob-key")


class _Node:
    """Stands for mesh.node.Node: one identity source (a bound method) handed to all of its caches."""

    def __init__(self, tls: EtcdTls) -> None:
        self._tls = tls

    def etcd_tls(self) -> EtcdTls:
        return self._tls


def _key(endpoints: str | EtcdAccess, interval: float = 1.0, timeout: float = 2.0) -> object:
    return channel_key(endpoints, interval, timeout)


def test_same_endpoints_and_identity_share() -> None:
    assert _key(EtcdAccess("127.0.0.1:2379", ALICE)) == _key(EtcdAccess("127.0.0.1:2379", ALICE))
    assert _key(EtcdAccess("127.0.0.1:2379", EtcdTls(b"ca", b"alice-cert", b"alice-key"))) == _key(
        EtcdAccess(["127.0.0.1:2379"], ALICE)
    ), "an equal certificate is the same etcd user, however the endpoints are spelled"
    node = _Node(ALICE)
    assert _key(EtcdAccess("h:1", node.etcd_tls)) == _key(EtcdAccess("h:1", node.etcd_tls))
    assert _key("127.0.0.1:2379") == _key("http://127.0.0.1:2379") == _key(EtcdAccess("127.0.0.1:2379"))


def test_different_identities_endpoints_or_probe_settings_never_share() -> None:
    assert _key(EtcdAccess("h:1", ALICE)) != _key(EtcdAccess("h:1", BOB))
    assert _key(EtcdAccess("h:1", ALICE)) != _key("h:1"), "TLS and plaintext never share"
    a, b = _Node(ALICE), _Node(ALICE)
    assert _key(EtcdAccess("h:1", a.etcd_tls)) != _key(EtcdAccess("h:1", b.etcd_tls)), (
        "two nodes' identity sources stay apart even while they hold equal certificates: either may renew"
    )
    assert _key(EtcdAccess("h:1", ALICE)) != _key(EtcdAccess("h:2", ALICE))
    assert _key("h:1", interval=1.0) != _key("h:1", interval=0.2), "a stricter probe is never traded away"
    assert _key("h:1", timeout=2.0) != _key("h:1", timeout=0.5)


def test_an_unhashable_identity_source_is_keyed_by_object() -> None:
    class Source:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self) -> EtcdTls:
            return ALICE

    s = Source()
    assert _key(EtcdAccess("h:1", s)) == _key(EtcdAccess("h:1", s))
    assert _key(EtcdAccess("h:1", s)) != _key(EtcdAccess("h:1", Source()))
