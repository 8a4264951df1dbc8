"""Port picking for children told their port before they bind it (mesh/ports.py)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from hivemesh.mesh.ports import ephemeral_range, free_port, is_free, lost_ports


def test_picked_ports_are_outside_the_ephemeral_range_and_bindable() -> None:
    low, high = ephemeral_range()
    rng = random.Random(7)
    picked = [free_port(rng=rng) for _ in range(50)]
    assert all(not low <= p <= high for p in picked), [p for p in picked if low <= p <= high]
    assert all(1024 < p < 65536 for p in picked)
    assert len(set(picked)) > 40, "picks are spread, so two processes rarely pick alike"
    with socket.socket() as s:
        s.bind(("127.0.0.1", picked[0]))  # free right after the pick


class _Scripted(random.Random):
    """A generator whose choices are given in advance."""

    def __init__(self, picks: list[int]) -> None:
        super().__init__()
        self.picks = iter(picks)

    def choice(self, seq: object) -> int:  # type: ignore[override]
        return next(self.picks)


def test_a_held_port_is_never_picked() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert not is_free("127.0.0.1", port)
        spare = next(p for p in range(20000, 21000) if is_free("127.0.0.1", p))
        assert free_port(rng=_Scripted([port, port, spare])) == spare


def test_the_ephemeral_range_is_read_from_the_kernel_or_defaults(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("40000\t50000\n")
    bad.write_text("garbage")
    assert ephemeral_range(good) == (40000, 50000)
    assert ephemeral_range(bad) == (32768, 60999)
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)


def test_lost_ports_reads_only_the_current_run_of_a_log(tmp_path: Path) -> None:
    log = tmp_path / "etcd.log"
    old = b'{"error":"listen tcp 127.0.0.1:21001: bind: address already in use"}\n'
    log.write_bytes(old)
    assert lost_ports(log) == {21001}
    assert lost_ports(log, len(old)) == set(), "an earlier run's failure is not this run's"
    with log.open("ab") as f:
        f.write(b'{"error":"listen tcp [::1]:21002: bind: address already in use"}\n')
    assert lost_ports(log, len(old)) == {21002}
    assert lost_ports(tmp_path / "missing") == set() and lost_ports(None) == set()


def test_ports_to_avoid_are_passed_over() -> None:
    """Ports picked for children not started yet are not bound, so only `avoid` keeps a pick from repeating."""
    a, b = [p for p in range(20000, 21000) if is_free("127.0.0.1", p)][:2]
    assert free_port(avoid={a}, rng=_Scripted([a, a, b])) == b
