"""The embedded etcd launcher and client factory, against a real etcd."""

from __future__ import annotations

import aetcd
import pytest

from hivemesh.mesh.etcd import EtcdServer, client, parse_endpoints, wait_connected


async def test_put_get_round_trip(etcd: aetcd.Client) -> None:
    await etcd.put(b"/hivemesh/test/a", b"1")
    got = await etcd.get(b"/hivemesh/test/a")
    assert got is not None and got.value == b"1"


async def test_restart_keeps_data(own_etcd: EtcdServer) -> None:
    c = client(own_etcd.access)
    await wait_connected(c)
    await c.put(b"/hivemesh/test/keep", b"yes")
    await c.close()
    own_etcd.stop()
    assert not own_etcd.running
    own_etcd.start()
    c = client(own_etcd.access)
    await wait_connected(c)
    got = await c.get(b"/hivemesh/test/keep")
    await c.close()
    assert got is not None and got.value == b"yes"


@pytest.mark.parametrize("bad", ["", "nohost", "h:notaport", ","])
def test_parse_endpoints_rejects_bad_input(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoints(bad)


def test_parse_endpoints_accepts_lists() -> None:
    assert parse_endpoints("127.0.0.1:1,http://127.0.0.1:2") == [("127.0.0.1", 1), ("127.0.0.1", 2)]
