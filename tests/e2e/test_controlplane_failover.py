"""Two `hivemesh controlplane` processes against one etcd: freeze the leader (SIGSTOP, this host's stand-in for a
partition), then kill the new one (SIGKILL). Leadership moves within the lease TTL, never to two replicas at once,
and a running client keeps getting tokens and certificates throughout, with no failed call."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.controlplane_endpoints import discover
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.keyspace import CONTROLPLANE_LEADER
from hivemesh.mesh.tls import join
from tests.support.meshenv import DEFAULT_GRANTS, TRUST_DOMAIN, copy_session_ca
from tests.support.spawn import REPO, freeze, stop

TTL_S = 2
AUDIENCE = f"spiffe://{TRUST_DOMAIN}/agent/echo"


async def _spawn_controlplane(
    tmp: Path, certs: Path, etcd: str, n: int
) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """`hivemesh controlplane` number n with a short leader TTL; (process, its ready line's fields)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    log = tmp / f"cp{n}.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hivemesh.controlplane.cli", "--certs-dir", str(certs), "--home",
            str(tmp / f"home{n}"), "controlplane", "--etcd", etcd, "--state-dir", str(tmp / f"state{n}"),
            "--trust-domain", TRUST_DOMAIN,
            "--grants", str(tmp / "grants.yaml"), "--leader-ttl", str(TTL_S),
            cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=err, start_new_session=True,
        )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    except TimeoutError:
        line = ""
    if not line.startswith("ready "):
        await stop(proc, kill=True)
        raise AssertionError(f"control plane {n} said {line!r}: {log.read_text()[-3000:]}")
    return proc, dict(kv.split("=", 1) for kv in line.split()[1:])


def _leader_metric(metrics: str) -> float | None:
    """hivemesh_controlplane_leader from a replica's /metrics (None: no answer, e.g. the process is frozen)."""
    try:
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=0.5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    m = re.search(r"^hivemesh_controlplane_leader (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


async def _leader(etcd: Any, adverts: dict[str, str]) -> str:
    """The control-plane address of the replica holding the leader key ("" none)."""
    got = await etcd.get(CONTROLPLANE_LEADER.encode())
    return adverts.get(got.value.decode(), "") if got is not None else ""


async def _until_leader(etcd: Any, adverts: dict[str, str], wanted: str, since: float, limit_s: float) -> float:
    while (await _leader(etcd, adverts)) != wanted:
        assert time.monotonic() - since < limit_s, f"{wanted} did not take over within {limit_s} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - since


@pytest.mark.slow
async def test_leader_frozen_then_killed_tokens_and_certificates_keep_coming(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    certs = copy_session_ca(tmp_path / "certs").certs_dir
    (tmp_path / "grants.yaml").write_text(yaml.safe_dump(DEFAULT_GRANTS))
    started = await asyncio.gather(*(_spawn_controlplane(tmp_path, certs, etcd_server.endpoint, n) for n in (1, 2)),
                                   return_exceptions=True)
    procs = [s[0] for s in started if not isinstance(s, BaseException)]
    client: ControlPlaneClient | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        for s in started:
            if isinstance(s, BaseException):
                raise s
        ready = [s[1] for s in started if not isinstance(s, BaseException)]
        by_addr = {r["controlplane"]: (p, r) for p, r in zip(procs, ready, strict=True)}
        adverts = {a.replica: a.controlplane for a in await discover(etcd)}
        assert set(adverts.values()) == set(by_addr), adverts  # both advertise themselves
        first = await _leader(etcd, adverts)
        assert first in by_addr
        other = next(a for a in by_addr if a != first)
        metrics = {a: r["metrics"] for a, (_, r) in by_addr.items()}
        assert _leader_metric(metrics[first]) == 1.0 and _leader_metric(metrics[other]) == 0.0

        # A client given both replicas (the leader first, so it is the one the client talks to when it freezes).
        operator = ControlPlaneClient.from_certs_dir(f"{first},{other}", certs)
        token = (await operator.create_join_token("runner", "client", 120)).token
        await operator.close()
        joins = ",".join(by_addr[a][1]["join"] for a in (first, other))
        workload = await join(joins, (certs / "ca.pem").read_bytes(), token, "runner", "client",
                              trust_domain=TRUST_DOMAIN)
        client = ControlPlaneClient(f"{first},{other}", workload, TRUST_DOMAIN, timeout_s=4.0)
        issued: list[tuple[float, str]] = []
        renewed: list[float] = []
        failures: list[str] = []
        both_led: list[float] = []

        async def issue() -> None:
            assert client is not None
            while True:
                try:
                    resp = await client.issue_token(AUDIENCE, ["echo"])
                    issued.append((time.monotonic(), jwt.get_unverified_header(resp.token)["kid"]))
                except HivemeshError as exc:
                    failures.append(f"token: {exc.reason}: {exc.message}")
                await asyncio.sleep(0.05)

        async def renew() -> None:
            assert client is not None
            while True:
                try:
                    await client.renew()
                    renewed.append(time.monotonic())
                except HivemeshError as exc:
                    failures.append(f"renew: {exc.reason}: {exc.message}")
                await asyncio.sleep(0.3)

        async def watch_leaders() -> None:  # a replica that answers must never claim to lead beside another
            while True:
                seen = await asyncio.gather(*(asyncio.to_thread(_leader_metric, m) for m in metrics.values()))
                if seen.count(1.0) > 1:
                    both_led.append(time.monotonic())
                await asyncio.sleep(0.1)

        async def served_since(t0: float, tokens: int = 5) -> None:
            """Until tokens tokens and a certificate were issued after t0 (bounded)."""
            deadline = time.monotonic() + 10
            while len([t for t, _ in issued if t > t0]) < tokens or not any(t > t0 for t in renewed):
                assert time.monotonic() < deadline, (len(issued), len(renewed), failures[:5])
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(f()) for f in (issue, renew, watch_leaders)]
        await served_since(0.0, 1)

        # 1. Freeze the leader: the other takes over within the TTL (plus a poll), calls move to it.
        frozen_at = time.monotonic()
        freeze(by_addr[first][0].pid)
        took_over = await _until_leader(etcd, adverts, other, frozen_at, TTL_S + 2.5)
        await served_since(frozen_at + took_over)
        assert client.address == other and client.failovers + client.hedges >= 1

        # 2. Let it run again: it knows at once it no longer leads (its lease clock ran out while frozen).
        os.kill(by_addr[first][0].pid, signal.SIGCONT)
        assert await asyncio.to_thread(_leader_metric, metrics[first]) == 0.0
        assert await asyncio.to_thread(_leader_metric, metrics[other]) == 1.0

        # 3. Kill the new leader: the first one leads again, calls fail over to it (connection refused: at once).
        killed_at = time.monotonic()
        by_addr[other][0].kill()
        took_back = await _until_leader(etcd, adverts, first, killed_at, TTL_S + 2.5)
        await served_since(killed_at + took_back)
        assert client.address == first

        assert failures == [], failures[:5]
        assert both_led == []
        assert len({kid for _, kid in issued}) == 1  # both replicas sign with the one shared key
        gaps = [b - a for (a, _), (b, _) in itertools.pairwise(issued)]
        print(f"\nFIGURE control-plane failover (TTL {TTL_S} s): frozen leader replaced in {took_over:.2f} s, "
              f"killed leader in {took_back:.2f} s; {len(issued)} tokens and {len(renewed)} certificates issued, "
              f"0 failed; longest gap between tokens {max(gaps):.2f} s")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if client is not None:
            await client.close()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
        await asyncio.gather(*(stop(p, kill=True) for p in procs))  # nothing left to check in a clean stop
