"""CLI commands while etcd is stopped (SIGSTOP: its kernel still accepts TCP, nothing answers) finish within their
bounds and name etcd, with a reason, as the component that did not answer.

Found by an SRE review: `hivemesh call extract --timeout 10` took 19.6 s (its node's etcd wait ignored --timeout),
`hivemesh controlplanes` took 11.8 s and said `etcd not reachable within 5 s: ` with no reason, and `hivemesh audit
tail` blamed the control plane (`did not answer within 10 s`) when etcd was the component stopped.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hivemesh.mesh.etcd import EtcdServer, client, wait_connected
from tests.support.meshenv import MeshEnv, run_cli, start_mesh_env, stop_mesh_env
from tests.support.spawn import frozen

pytestmark = pytest.mark.timeout(120)

CALL_TIMEOUT_S = 4
"""The --timeout given to `hivemesh call`: the whole command ends within about it."""
SLACK_S = 2.5
"""What a command may take past its bound: a child process's start and exit on a shared 2-core machine."""


async def _timed(env: MeshEnv, *args: str) -> tuple[int, str, str, float]:
    start = time.monotonic()
    code, out, err = await run_cli(env, *args, timeout=40)
    return code, out, err, time.monotonic() - start


@pytest.fixture
async def env(own_etcd: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MeshEnv]:
    monkeypatch.setenv("COLUMNS", "300")  # error lines unwrapped (run_cli hands the child this environment)
    mesh = await start_mesh_env(tmp_path, own_etcd.endpoint)
    try:
        code, _, err = await run_cli(mesh, "controlplanes")  # with etcd up, it works
        assert code == 0, err
        yield mesh
    finally:
        await stop_mesh_env(mesh)


async def test_call_with_etcd_stopped_ends_within_its_timeout_and_says_why_it_needs_etcd(
    env: MeshEnv, own_etcd: EtcdServer
) -> None:
    assert own_etcd.pid is not None
    with frozen(own_etcd.pid):
        code, _, err, took = await _timed(env, "call", "extract", "--timeout", str(CALL_TIMEOUT_S))
    assert code == 1, err
    assert took < CALL_TIMEOUT_S + SLACK_S, f"call took {took:.1f} s with --timeout {CALL_TIMEOUT_S}: {err}"
    assert "REGISTRY_UNAVAILABLE" in err and f"not reachable within {CALL_TIMEOUT_S} s" in err, err
    assert "`hivemesh call` starts a node of its own, which needs etcd to find the agents" in err, err
    assert "SDK callers already running keep calling meanwhile, on their registry caches" in err, err
    assert "Traceback" not in err, err


async def test_controlplanes_with_etcd_stopped_ends_within_its_wait_and_gives_a_reason(
    env: MeshEnv, own_etcd: EtcdServer
) -> None:
    assert own_etcd.pid is not None
    with frozen(own_etcd.pid):
        code, _, err, took = await _timed(env, "controlplanes")
    assert code == 1, err
    assert took < 5 + SLACK_S, f"controlplanes took {took:.1f} s: {err}"
    assert "etcd not reachable within 5 s: no answer" in err, err  # was `...within 5 s: ` and nothing after


async def test_audit_tail_with_etcd_stopped_is_answered_promptly_naming_etcd_not_the_control_plane(
    env: MeshEnv, own_etcd: EtcdServer
) -> None:
    assert own_etcd.pid is not None
    with frozen(own_etcd.pid):
        code, _, err, took = await _timed(env, "audit", "tail")
    assert code == 1, err
    assert took < 8, f"audit tail took {took:.1f} s: {err}"  # the CLI's own wait is 10 s
    assert "REGISTRY_UNAVAILABLE" in err and "etcd not reachable" in err, err
    assert "CONTROL_PLANE_UNAVAILABLE" not in err, err
    # etcd back: the read works again (the sync that outlived the refused read left nothing broken).
    code, _, err = await run_cli(env, "audit", "tail")
    assert code == 0, err


async def test_audit_reads_while_etcd_is_stopped_share_one_sync(env: MeshEnv, own_etcd: EtcdServer) -> None:
    """Each refused read left a sync of the mesh-wide log behind, waiting on the store's lock for etcd's timeout:
    `audit tail -f` (a read a second) piled them up. Reads that come while one runs share it."""
    import asyncio

    from hivemesh.v1 import audit_pb2

    def syncs() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "").endswith("Store.sync")]

    assert own_etcd.pid is not None
    with frozen(own_etcd.pid):
        reads = [env.operator.call(env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=10)) for _ in range(4)]
        outcomes = await asyncio.gather(*reads, return_exceptions=True)
        assert all(getattr(o, "reason", "") == "REGISTRY_UNAVAILABLE" for o in outcomes), outcomes
        assert len(syncs()) <= 1, f"{len(syncs())} syncs pending for 4 reads"
    code, _, err = await run_cli(env, "audit", "tail")  # etcd back: the shared sync ended, reads work again
    assert code == 0, err


async def test_wait_connected_to_a_stopped_etcd_ends_at_its_timeout_with_a_reason(own_etcd: EtcdServer) -> None:
    """The CLI's etcd connect (`hivemesh controlplanes`, `slo`, `agents`...): a 2 s probe begun inside a 1 s wait
    outlived it, and connect() had no bound at all."""
    assert own_etcd.pid is not None
    c = client(own_etcd.access)
    try:
        await wait_connected(c)  # up: connected at once
        with frozen(own_etcd.pid):
            start = time.monotonic()
            with pytest.raises(TimeoutError) as caught:
                await wait_connected(c, timeout=1.0)
            took = time.monotonic() - start
    finally:
        await c.close()
    assert took < 1.5, f"a 1 s wait took {took:.1f} s"
    assert str(caught.value).startswith("etcd not reachable within 1 s: no answer"), caught.value
