"""Shared fixtures: a real etcd member on free loopback ports, and a throwaway state folder per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aetcd
import hypothesis
import pytest

from hivemesh.controlplane.ca import CaFiles, init_ca, load_ca
from hivemesh.controlplane.etcd_certs import issue_etcd_certs
from hivemesh.mesh.etcd import EtcdServer, EtcdServerTls, client, wait_connected
from tests.support import meshenv
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, start_mesh_env, stop_mesh_env

_EARLY_IMPORTS = (hypothesis,)
"""hypothesis is imported with the fixtures, not by its pytest plugin in the end-of-session summary: that late
import goes through pytest's assertion rewriter, whose ast.parse fails there on CPython 3.11.7 ("SystemError: AST
constructor recursion depth mismatch"), so a run of one file that does not use hypothesis ended with exit status
1 after every test passed (seen with tests/integration/test_sidecar.py alone)."""


@dataclass(frozen=True)
class SessionCa:
    """The session's mesh CA, which also signs etcd's certificate: etcd 3.5 reads `--trusted-ca-file` once, so
    the session etcd can only trust a CA that exists before it starts; every test mesh copies this one."""

    files: CaFiles
    tls: EtcdServerTls

    def etcd_server(self, base: Path) -> EtcdServer:
        """A member (not started) serving mutual TLS with auth on, trusting this CA."""
        return EtcdServer(data_dir=base / "data", log_path=base / "etcd.log", tls=self.tls)


@pytest.fixture(scope="session", autouse=True)
def session_ca(tmp_path_factory: pytest.TempPathFactory) -> SessionCa:
    files = init_ca(tmp_path_factory.mktemp("session-ca") / "certs", TRUST_DOMAIN)
    meshenv.SESSION_CA_DIR = files.certs_dir
    return SessionCa(files, issue_etcd_certs(load_ca(files.certs_dir), files.certs_dir))


@pytest.fixture(autouse=True)
def _private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own HIVEMESH_HOME: state written by default (audit spools, stores, the CLI's
    mesh.json) lands in the test's tmp dir, never in the working tree or a developer's `hivemesh up` state."""
    monkeypatch.setenv("HIVEMESH_HOME", str(tmp_path / "hivemesh-home"))


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory, session_ca: SessionCa) -> Iterator[EtcdServer]:
    """One real etcd member for the whole session (tests isolate themselves by key prefix or cleanup), mutual
    TLS and auth on; `etcd_server.access` is the harness's root identity."""
    server = session_ca.etcd_server(tmp_path_factory.mktemp("etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_etcd(tmp_path: Path, session_ca: SessionCa) -> Iterator[EtcdServer]:
    """A private etcd member for tests that stop, kill or restart etcd (mutual TLS and auth on)."""
    server = session_ca.etcd_server(tmp_path / "own-etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def etcd(etcd_server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    """A connected root client to the session etcd; the /hivemesh/ keyspace is wiped before each test."""
    c = client(etcd_server.access)
    await wait_connected(c)
    await c.delete_prefix(b"/hivemesh/")
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def mesh_env(etcd: aetcd.Client, etcd_server: EtcdServer, tmp_path: Path) -> AsyncIterator[MeshEnv]:
    """A control plane with a fresh CA on free ports, over the session etcd (keyspace wiped per test)."""
    env = await start_mesh_env(tmp_path, etcd_server.endpoint)
    try:
        yield env
    finally:
        await stop_mesh_env(env)


# The orchestration tests' mesh (a control plane that lets every workload call, a client, CLI helpers).
from tests.support.orch_env import orch  # noqa: E402, F401 - a fixture, used by name
from tests.support.up_process import up_runs  # noqa: E402, F401 - a fixture, used by name


@pytest.fixture(autouse=True)
def _handshake_consent_stays_in_its_test() -> Iterator[None]:
    """A test that runs a command's main in-process (`agents.run`, a CLI command) consents to the handshake audit
    for this whole process (`switch.enable()`, which may also set GRPC_TRACE); put both back afterwards, so no
    later test inherits them."""
    from hivemesh.mesh.audit.handshake import switch

    enabled, trace = switch._enabled, os.environ.get("GRPC_TRACE")
    yield
    switch._enabled = enabled
    if trace is None:
        os.environ.pop("GRPC_TRACE", None)
    else:
        os.environ["GRPC_TRACE"] = trace
