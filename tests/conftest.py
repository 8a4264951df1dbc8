"""Shared fixtures: a real etcd member on free loopback ports, and a throwaway state folder per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest

from hivemesh.mesh.etcd import EtcdServer, client, wait_connected
from tests.support.meshenv import MeshEnv, start_mesh_env, stop_mesh_env


@pytest.fixture(autouse=True)
def _private_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own HIVEMESH_HOME: state written by default (audit spools, stores, the CLI's
    mesh.json) lands in the test's tmp dir, never in the working tree or a developer's `hivemesh up` state."""
    monkeypatch.setenv("HIVEMESH_HOME", str(tmp_path / "hivemesh-home"))


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd member for the whole session (tests isolate themselves by key prefix or cleanup)."""
    base = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(data_dir=base / "data", log_path=base / "etcd.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A private etcd member for tests that stop, kill or restart etcd."""
    server = EtcdServer(data_dir=tmp_path / "etcd-data", log_path=tmp_path / "etcd.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def etcd(etcd_server: EtcdServer) -> AsyncIterator[aetcd.Client]:
    """A connected client to the session etcd; the /hivemesh/ keyspace is wiped before each test."""
    c = client(etcd_server.endpoint)
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
