"""TLS handshake refusals are audited like every other decision, in both packagings, end to end.

Each packaging runs as a real process, because gRPC reads its tracer setting once, at import: a sidecar
through the `hivemesh sidecar` CLI and an SDK agent, both started with GRPC_TRACE (and the consent) in their
environment, as `hivemesh up` does. Each attack makes exactly one TCP connection (Python's
own TLS client, or a raw socket), so its record can be matched by the attacker's source port; the records are
read back from the control plane, so they were also chained, shipped and stored.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.mesh.audit.handshake.events import port_of
from hivemesh.mesh.audit.handshake.switch import child_environment
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.pki import parse_spiffe_id
from hivemesh.mesh.tls import channel_credentials, secure_channel
from hivemesh.v1 import audit_pb2
from tests.support.controlplane_process import controlplane_process
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, copy_session_ca, run_cli
from tests.support.plain_agent import PlainAgent
from tests.support.spawn import start_replica, start_sidecar, stop
from tests.support.tls_attacks import H2_PREFACE, attacker_context, raw_attempt, tls_attempt
from tests.support.traffic_status import wait_traffic_status

GARBAGE = b"\x16\x03\x01\x00\x05hello" + bytes(range(64))  # a TLS record header, then nonsense


@dataclass
class Target:
    packaging: str
    endpoint: str
    env: MeshEnv
    tmp: Path

    @property
    def server_name(self) -> str:
        name = "plain" if self.packaging == "sidecar" else "echo"
        return parse_spiffe_id(f"spiffe://{TRUST_DOMAIN}/agent/{name}").dns_name

    @property
    def port(self) -> int:
        return int(self.endpoint.rpartition(":")[2])


@pytest.fixture(params=["sidecar", "in-process"])
async def target(request: pytest.FixtureRequest, mesh_env: MeshEnv, tmp_path: Path) -> AsyncIterator[Target]:
    log = tmp_path / f"{request.param}.log"
    if request.param == "sidecar":
        async with PlainAgent("plain") as plain:
            proc, endpoint = await start_sidecar(mesh_env, plain.endpoint, tmp_path / "home", log,
                                                 **child_environment({}, inherit={}))
            try:
                yield Target("sidecar", endpoint, mesh_env, tmp_path)
            finally:
                await stop(proc)
    else:
        proc, endpoint = await start_replica(mesh_env, "echo-1", tmp_path / "home", log,
                                             **child_environment({}, inherit={}))
        try:
            yield Target("in-process", endpoint, mesh_env, tmp_path)
        finally:
            await stop(proc)


def _cert(t: Target, ca_dir: Path, ttl_s: int) -> tuple[bytes, bytes]:
    sid = parse_spiffe_id(f"spiffe://{TRUST_DOMAIN}/client/attacker")
    return load_ca(ca_dir).issue_with_new_key(str(sid), common_name=sid.name, dns_names=[sid.dns_name], ttl_s=ttl_s)


def _other_ca(t: Target) -> int:
    rogue = t.tmp / "rogue-ca"
    if not (rogue / "ca.pem").exists():
        init_ca(rogue, TRUST_DOMAIN)
    return tls_attempt(t.port, attacker_context(t.tmp, *_cert(t, rogue, 600)))


def _expired(t: Target) -> int:
    cert, key = _cert(t, t.env.certs.certs_dir, 1)
    time.sleep(1.6)
    return tls_attempt(t.port, attacker_context(t.tmp, cert, key))


ATTACKS: list[tuple[str, Callable[[Target], int], str, str]] = [
    ("certificate from another CA", _other_ca, "TLS_CERT_UNTRUSTED", "deny"),
    ("expired certificate", _expired, "TLS_CERT_EXPIRED", "deny"),
    ("no client certificate", lambda t: tls_attempt(t.port, attacker_context(t.tmp)), "TLS_CERT_MISSING", "deny"),
    ("plaintext HTTP/2", lambda t: raw_attempt(t.port, H2_PREFACE), "TLS_PLAINTEXT", "deny"),
    ("garbage bytes", lambda t: raw_attempt(t.port, GARBAGE), "TLS_HANDSHAKE_FAILED", "deny"),
    ("connect and hang up", lambda t: raw_attempt(t.port, b""), "TLS_CONNECTION_CLOSED", "error"),
]


async def _handshake_records(env: MeshEnv) -> list[dict[str, Any]]:
    resp = await env.operator.call(env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=10000,
                                                                                        kind="handshake"))
    records = [json.loads(e)["record"] for e in resp.entries]
    assert all(r["kind"] == "handshake" for r in records), records  # the control plane filters by kind
    return records


async def _wait_for(env: MeshEnv, done: Callable[[list[dict[str, Any]]], bool],
                    timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        records = await _handshake_records(env)
        if done(records) or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_every_refused_handshake_is_on_record_and_grpc_clients_see_unavailable(target: Target) -> None:
    """Two checks on one node process (it costs seconds to start): each raw attack's one record, then real
    gRPC clients refused in the handshake (their records are counted per reason, so the first part's records
    do not count for them)."""
    expired = _cert(target, target.env.certs.certs_dir, 1)  # past its notAfter by the time the gRPC part runs
    expired_at = time.monotonic() + 1.6
    await _every_refused_handshake_gets_one_audit_record(target)
    await asyncio.sleep(max(0.0, expired_at - time.monotonic()))
    await _grpc_clients_refused_in_the_handshake_see_unavailable_and_are_on_record(target, expired)


async def _every_refused_handshake_gets_one_audit_record(target: Target) -> None:
    table: list[str] = []
    for name, attack, reason, decision in ATTACKS:
        # The OS may give an attack the client port an earlier one used, so only records new since this
        # attack began are its own (matching by port alone once took the rogue-CA record for the expired one).
        seen = {r["hash"] for r in await _handshake_records(target.env)}

        def new(rs: list[dict[str, Any]], p: int, seen: set[str] = seen) -> list[dict[str, Any]]:
            return [r for r in rs if r["hash"] not in seen and r["remote"].endswith(f":{p}")]

        port = await asyncio.to_thread(attack, target)
        records = await _wait_for(target.env, lambda rs, p=port: bool(new(rs, p)))
        mine = new(records, port)
        assert len(mine) == 1, f"{name}: expected one record from port {port}, got {mine} (all: {records})"
        rec = mine[0]
        assert (rec["reason"], rec["decision"], rec["status"], rec["count"]) == (reason, decision, "UNAVAILABLE", 1), \
            f"{name}: {rec}"
        assert rec["listener"].endswith(f":{target.port}") and rec["caller"] == "" and rec["node"], rec
        table.append(f"| {name} | {rec['reason']} | {rec['decision']} | {rec['message']} |")

    # `hivemesh status` shows the audit live on that node, with its refusals counted.
    name = "plain" if target.packaging == "sidecar" else "echo"

    async def audit_status() -> dict[str, Any] | None:
        code, out, err = await run_cli(target.env, "status", "--json")
        assert code == 0, err
        mine = [n for n in json.loads(out) if n["identity"].endswith(f"/agent/{name}")]
        return mine[0] if mine and mine[0]["handshakes_refused"] >= len(ATTACKS) else None

    await wait_traffic_status(target.env, lambda nodes: any(
        n.identity.endswith(f"/agent/{name}") and n.handshakes_refused >= len(ATTACKS) for n in nodes), 30)
    node = await audit_status()  # what the CLI shows, once the status says it (polled in-process)
    assert node is not None and node["handshake_audit"] == "live", node
    code, out, err = await run_cli(target.env, "status")
    assert code == 0 and "TLS handshake audit" in out and "live" in out, out + err
    print(f"\nFIGURE handshake refusals ({target.packaging}): {len(ATTACKS)} attacks, one record each\n"
          + "\n".join(table))


def _total(records: list[dict[str, Any]], reason: str) -> int:
    return sum(r["count"] for r in records if r["reason"] == reason)


async def _grpc_clients_refused_in_the_handshake_see_unavailable_and_are_on_record(
    target: Target, expired: tuple[bytes, bytes]
) -> None:
    """The negative matrix's four handshake cases with real gRPC clients: the exact status the client sees,
    and the record. A gRPC client may try more than one connection, so the reason's count must grow."""
    ca = target.env.certs.ca_cert.read_bytes()
    rogue = target.tmp / "rogue-ca"
    if not (rogue / "ca.pem").exists():
        init_ca(rogue, TRUST_DOMAIN)
    cases: list[tuple[str, grpc.ChannelCredentials | None, str]] = [
        ("certificate from another CA", channel_credentials(ca, *_cert(target, rogue, 600)), "TLS_CERT_UNTRUSTED"),
        ("expired certificate", channel_credentials(ca, *expired), "TLS_CERT_EXPIRED"),
        ("no client certificate", channel_credentials(ca), "TLS_CERT_MISSING"),
        ("plaintext", None, "TLS_PLAINTEXT"),
    ]
    for name, creds, reason in cases:
        before = _total(await _handshake_records(target.env), reason)
        channel = (grpc.aio.insecure_channel(target.endpoint) if creds is None
                   else secure_channel(target.endpoint, creds, server_name=target.server_name))
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary("/hivemesh.v1.Agent/Describe")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, f"{name}: {err.value}"
        records = await _wait_for(target.env, lambda rs, r=reason, b=before: _total(rs, r) > b)
        assert _total(records, reason) > before, f"{name}: no {reason} record (all: {records})"


@pytest.mark.slow
async def test_a_handshake_flood_is_coalesced_and_every_refusal_counted(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 60
    ports = [await asyncio.to_thread(raw_attempt, target.port, b"") for _ in range(n)]
    records = await _wait_for(target.env, lambda rs: sum(r["count"] for r in rs) >= n)
    closed = [r for r in records if r["reason"] == "TLS_CONNECTION_CLOSED"]
    assert sum(r["count"] for r in closed) == n, closed
    assert len(closed) < n, "a flood should be coalesced into fewer records"
    assert {r["remote"].rpartition(":")[0] for r in closed} == {"ipv4:127.0.0.1"}
    assert len(set(ports)) == n
    # What an operator sees: the same records through the CLI, as JSON and as a table.
    code, out, err = await run_cli(target.env, "audit", "query", "--kind", "handshake", "--json")
    assert code == 0, err
    assert sum(json.loads(x)["record"]["count"] for x in out.splitlines() if x) == n
    monkeypatch.setenv("COLUMNS", "250")  # the CLI's table, wide enough not to elide
    code, out, err = await run_cli(target.env, "audit", "query", "--kind", "handshake")
    assert code == 0 and "TLS handshake ×" in out and "(no identity)" in out, out + err
    code, out, err = await run_cli(target.env, "audit", "query", "--kind", "nonsense")
    assert code == 2 and "nonsense" in err, err
    print(f"\nFIGURE handshake flood ({target.packaging}): {n} refused connections -> {len(closed)} records, "
          f"counts summing to {sum(r['count'] for r in closed)}")


@pytest.mark.slow
async def test_the_control_planes_ports_audit_refused_handshakes(
    etcd: Any, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """`hivemesh controlplane` as a real process, started with the tracer as a launcher does: handshakes
    refused on its mutual-TLS port and on its join port are in its own audit log."""
    certs = copy_session_ca(tmp_path / "certs").certs_dir  # the CA etcd trusts
    async with controlplane_process(tmp_path, certs, etcd_server.endpoint) as cp, \
            ControlPlaneClient.from_certs_dir(cp.controlplane, certs) as operator:
        control, join = cp.controlplane, cp.join
        ports = {
            await asyncio.to_thread(tls_attempt, port_of(control), attacker_context(tmp_path)):
                ("TLS_CERT_MISSING", control),
            await asyncio.to_thread(raw_attempt, port_of(join), H2_PREFACE): ("TLS_PLAINTEXT", join),
        }
        deadline = time.monotonic() + 30
        while True:
            resp = await operator.call(operator.audit.Query, audit_pb2.AuditQueryRequest(limit=10000))
            records = [json.loads(e)["record"] for e in resp.entries]
            mine = {int(r["remote"].rpartition(":")[2]): r for r in records if r.get("kind") == "handshake"}
            if set(ports) <= set(mine) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        for port, (reason, listener) in ports.items():
            assert port in mine, f"no record for the connection from port {port} ({reason}): {records}"
            rec = mine[port]
            assert (rec["reason"], rec["status"], rec["listener"]) == (reason, "UNAVAILABLE", listener), rec
            assert rec["node"] == f"spiffe://{TRUST_DOMAIN}/controlplane", rec

