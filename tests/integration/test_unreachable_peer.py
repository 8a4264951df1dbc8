"""A dead instance still in the registry is tried less and less often (issue 11, "Faults that cross the network"
bullet 3), on the real mesh: real etcd, real TLS, a real closed port.

A SIGKILLed replica stays registered until its lease expires. Its entry is reproduced here as the killed
replica leaves it: a copy of a live replica's entry whose endpoint is a loopback port nobody listens on (and no
lease, so it stays for the whole window). A caller sends one call after another; every call succeeds on the
live replica, and the calls that tried the dead one first (each a refused connection, counted by
`hivemesh_peer_unreachable_total`) come further and further apart: the suspicion doubles after each refusal.
The suspicion times are scaled down 20x (base 0.1 s, cap 1.6 s instead of 2 s and 30 s) to keep the window short.
"""

from __future__ import annotations

import itertools
import time

import aetcd
import pytest

from hivemesh.mesh.outbound import selection
from hivemesh.mesh.ports import free_port
from hivemesh.mesh.registry import agent_key
from hivemesh.sdk import MeshClient
from hivemesh.v1 import mesh_pb2
from tests.support.meshenv import MeshEnv
from tests.support.resilience_rig import fleet

pytestmark = pytest.mark.timeout(60)

WINDOW_S = 3.0


async def test_a_dead_instance_is_probed_ever_more_rarely_while_a_live_one_takes_every_call(
    mesh_env: MeshEnv, etcd: aetcd.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selection, "_SUSPECT_S", 0.1)
    monkeypatch.setattr(selection, "_SUSPECT_MAX_S", 1.6)
    async with fleet(mesh_env, ("live",)) as f:
        live = f.servers[0]
        kv = await etcd.get(agent_key("flaky", live.instance_id).encode())
        assert kv is not None
        dead = mesh_pb2.AgentInstance.FromString(kv.value)
        dead.instance_id, dead.endpoint = "flaky-dead", f"127.0.0.1:{free_port()}"  # nobody listens there
        dead.link_endpoint = f"127.0.0.1:{free_port()}"  # nor on its direct link (else the live agent's answers)
        await etcd.put(agent_key("flaky", dead.instance_id).encode(), dead.SerializeToString())
        settings = await mesh_env.settings_for("prober", "client")
        async with MeshClient.connect(name="prober", settings=settings, metrics_listen="127.0.0.1:0") as client:
            assert await client.node.registry.wait_for_capability("work", 2, timeout=10)
            metrics = client.node.metrics
            assert metrics is not None
            labels = {"capability": "work", "peer": dead.identity}

            def refused() -> float:
                return metrics.metrics.registry.get_sample_value("hivemesh_peer_unreachable_total", labels) or 0.0

            served: dict[str, int] = {}
            refusals: list[float] = []  # when a call met the dead instance's closed port
            started = time.monotonic()
            while time.monotonic() - started < WINDOW_S:
                before = refused()
                reply = await client.call("work", {}, timeout=5)  # any failure fails the test
                served[reply["served_by"]] = served.get(reply["served_by"], 0) + 1
                if refused() > before:
                    refusals.append(time.monotonic() - started)
            calls = sum(served.values())
            gaps = [round(b - a, 2) for a, b in itertools.pairwise(refusals)]
            print(f"\n{calls} calls in {WINDOW_S:.0f} s, all served by {served}; refused connections to the dead "
                  f"instance: {len(refusals)} (gaps {gaps} s; a fixed 0.1 s suspicion would have allowed "
                  f"~{WINDOW_S / 0.1:.0f})")
        await etcd.delete(agent_key("flaky", dead.instance_id).encode())
    assert served == {"live": calls} and calls > 50
    # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 ... : at most 8 refusals fit in 3 s (plus one: the first), however fast calls are.
    assert 3 <= len(refusals) <= 9, refusals
    # The gaps grow. Compared with the shortest, not the first: a pause of a busy machine once stretched the first
    # gap to 0.25 s (gaps 0.25, 0.2, 0.4, 0.8), and a pause only ever lengthens a gap it falls in.
    assert gaps[-1] >= 1.5 * min(gaps), gaps
