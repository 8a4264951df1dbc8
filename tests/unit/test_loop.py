"""`mesh/loop.py`: hivemesh's processes run on uvloop where it is installed, asyncio's loop when asked, and a gRPC
call with mutual TLS works on it (a real server and client on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hivemesh.mesh import loop
from hivemesh.mesh.loop import LOOP_ENV, loop_factory


async def _loop_kind() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_the_default_is_uvloop_and_asyncio_is_kept_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOOP_ENV, raising=False)
    assert loop.run(_loop_kind()) is uvloop.Loop
    monkeypatch.setenv(LOOP_ENV, "asyncio")
    assert not issubclass(loop.run(_loop_kind()), uvloop.Loop)
    assert loop.run(_loop_kind(), choice="uvloop") is uvloop.Loop  # an explicit choice wins over the variable


def test_an_unknown_choice_is_refused_and_its_coroutine_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOOP_ENV, "trio")
    work = _loop_kind()
    with pytest.raises(ValueError, match="HIVEMESH_LOOP must be one of auto, uvloop, asyncio"):
        loop.run(work)
    assert work.cr_frame is None  # closed: no "never awaited" warning


def test_uvloop_required_but_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "uvloop", None)  # as if not installed
    assert loop_factory("auto") is None
    with pytest.raises(RuntimeError, match="uvloop is not installed"):
        loop_factory("uvloop")


async def _health_over_mtls(certs: Path) -> tuple[type[asyncio.AbstractEventLoop], int]:
    from hivemesh.mesh.tls import channel_credentials, channel_options, server_credentials

    ca = (certs / "ca.pem").read_bytes()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(
        (certs / "server.pem").read_bytes(), (certs / "server.key").read_bytes(), ca))
    await server.start()
    try:
        creds = channel_credentials(ca, (certs / "client.pem").read_bytes(), (certs / "client.key").read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=channel_options("localhost")) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return type(asyncio.get_running_loop()), reply.status
    finally:
        await server.stop(None)


def test_a_mutual_tls_grpc_call_works_on_uvloop(tmp_path: Path) -> None:
    from hivemesh.controlplane.ca import init_ca, load_ca

    init_ca(tmp_path / "ca", "hivemesh.test")
    ca = load_ca(tmp_path / "ca")
    (tmp_path / "ca.pem").write_bytes((tmp_path / "ca" / "ca.pem").read_bytes())
    for name, (cert, key) in (("server", ca.issue_controlplane_cert()), ("client", ca.issue_operator_cert())):
        (tmp_path / f"{name}.pem").write_bytes(cert)
        (tmp_path / f"{name}.key").write_bytes(key)
    kind, status = loop.run(_health_over_mtls(tmp_path), choice="uvloop")
    assert kind is uvloop.Loop and status == health_pb2.HealthCheckResponse.SERVING
