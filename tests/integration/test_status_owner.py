"""`hivemesh status` shows a status only as the workload its key belongs to (security review): a real agent
(`agent/mallory`, its own etcd user) writes, under its own `status/agent/mallory/` prefix as etcd lets it, a
`NodeTraffic` naming `agent/storage` with a breaker open on `store`. Neither `read_status` nor the operator's
`hivemesh status` attributes it to storage; the control plane warns once, naming the key; the genuine statuses
of both agents still show."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aetcd
import pytest

from hivemesh.mesh.etcd import client, wait_connected
from hivemesh.mesh.node import MeshNode
from hivemesh.mesh.status import read_status, status_key
from hivemesh.v1 import policy_pb2
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, run_cli

STORAGE = f"spiffe://{TRUST_DOMAIN}/agent/storage"
MALLORY = f"spiffe://{TRUST_DOMAIN}/agent/mallory"


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def _fake_storage() -> policy_pb2.NodeTraffic:
    fake = policy_pb2.NodeTraffic(identity=STORAGE, instance="storage-1", updated_unix_ms=int(time.time() * 1000))
    fake.capabilities.add(capability="store", direction="inbound", breaker="open", calls=1000, error_rate=1.0)
    return fake


async def test_a_status_naming_another_identity_is_not_shown_as_it(
    mesh_env: MeshEnv, etcd: aetcd.Client, caplog: pytest.LogCaptureFixture,
) -> None:
    storage = MeshNode(await mesh_env.settings_for("storage"), name="storage", kind="agent")
    mallory = MeshNode(await mesh_env.settings_for("mallory"), name="mallory", kind="agent")
    async with storage, mallory:

        async def both_published() -> bool:
            return {STORAGE, MALLORY} <= {n.identity for n in await read_status(etcd)}

        await _until(both_published, 15, "both agents' own statuses")

        # Mallory's own etcd user writes the fake under its own prefix: etcd allows it.
        key = status_key("agent", "mallory", "fake")
        as_mallory = client(mallory.etcd)
        await wait_connected(as_mallory)
        # And itself, as of another trust domain: its own name, so only the control plane's trust domain tells.
        foreign = policy_pb2.NodeTraffic(identity=MALLORY.replace(f"//{TRUST_DOMAIN}/", "//other.example/"),
                                         instance="mallory-x", updated_unix_ms=int(time.time() * 1000))
        foreign_key = status_key("agent", "mallory", "foreign")
        try:
            await as_mallory.put(key.encode(), _fake_storage().SerializeToString())
            await as_mallory.put(foreign_key.encode(), foreign.SerializeToString())
        finally:
            await as_mallory.close()
        assert await etcd.get(key.encode()) is not None

        caplog.set_level(logging.WARNING, logger="hivemesh.mesh.status")
        for _ in range(2):
            nodes = await read_status(etcd)
            assert [n.identity for n in nodes].count(STORAGE) == 1, [n.identity for n in nodes]
            assert [n.identity for n in nodes].count(MALLORY) == 1, "mallory's own status still shows"
            shown = next(n for n in nodes if n.identity == STORAGE)
            assert shown.instance == storage.instance_id
            assert not [c for c in shown.capabilities if c.breaker == "open"], shown
        warnings = [r.getMessage() for r in caplog.records if key in r.getMessage()]
        assert len(warnings) == 1 and STORAGE in warnings[0] and "agent/mallory" in warnings[0], warnings

        # The operator's view, through the control plane (Policies.GetTrafficStatus).
        code, out, err = await run_cli(mesh_env, "status", "--json")
        assert code == 0, err[-2000:]
        listed: list[dict[str, Any]] = json.loads(out)
        assert sorted(n["identity"] for n in listed if n["identity"] in (STORAGE, MALLORY)) == [MALLORY, STORAGE]
        assert not [c for n in listed for c in n["capabilities"] if c["breaker"] == "open"], listed
        assert foreign.identity not in {n["identity"] for n in listed}, listed
