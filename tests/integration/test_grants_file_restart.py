"""A control plane's `--grants` file at start writes the grants it names and deletes only grants it wrote itself,
against a real etcd and real control planes: a restart (as `hivemesh up` does, with its demo file, on every start)
keeps what `hivemesh allow` and `policy apply` wrote, so the token gate still lets their callers in; a second
replica starting with the same file changes no grant (no key's revision moves); and a grant the file stops naming
is deleted only while it still holds what the file wrote (an operator who edited it since made it theirs)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import yaml

from hivemesh.controlplane.server import ControlPlaneConfig, ControlPlaneServer
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.tls import join
from tests.support.meshenv import (
    TRUST_DOMAIN,
    apply_policies_text,
    copy_session_ca,
    run_cli,
    start_mesh_env,
    stop_mesh_env,
)

TD = f"spiffe://{TRUST_DOMAIN}"
EXTRACTOR = f"{TD}/agent/extractor"
FILE_GRANTS: dict[str, Any] = {"grants": [
    {"name": "file-operators", "subjects": [f"{TD}/operator/*"], "capabilities": ["*"]},
    {"name": "file-agents", "subjects": [f"{TD}/agent/*"], "capabilities": ["get"]},
]}
"""No grant here names client/alice: only `hivemesh allow` lets her have a token."""


async def _grant_revisions(etcd: aetcd.Client) -> dict[bytes, int]:
    """Every key under /hivemesh/grants* (the grants and whatever the control plane keeps about them) and its
    mod revision: a start that writes any of them moves one."""
    return {kv.key: int(kv.mod_revision) for kv in await etcd.get_prefix(b"/hivemesh/grants")}


async def _grant_names(etcd: aetcd.Client) -> set[str]:
    return {kv.key.decode().removeprefix("/hivemesh/grants/") for kv in await etcd.get_prefix(b"/hivemesh/grants/")}


@contextlib.asynccontextmanager
async def _controlplane(config: ControlPlaneConfig) -> AsyncIterator[ControlPlaneServer]:
    server = ControlPlaneServer(config)
    try:
        await server.start()
        yield server
    finally:
        await server.stop(0)


async def test_a_restart_with_the_grants_file_keeps_what_allow_wrote_and_a_second_replica_changes_nothing(
    etcd: aetcd.Client, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, FILE_GRANTS)
    config = env.controlplane.config
    try:
        code, out, err = await run_cli(env, "allow", "client/alice", "extract")
        assert code == 0, out + err
        token = await env.operator.create_join_token("alice", "client", 60)
        alice = await join(env.controlplane.join_address, env.certs.ca_cert.read_bytes(), token.token, "alice",
                           "client")
        async with ControlPlaneClient(env.controlplane.address, alice, TRUST_DOMAIN) as client:
            assert list((await client.issue_token(EXTRACTOR, ["extract"])).scopes) == ["extract"]
    finally:
        await stop_mesh_env(env)

    # The same control plane started again, with the same grants file: what allow wrote is still in force.
    async with _controlplane(config) as restarted:
        names = await _grant_names(etcd)
        assert names == {"file-operators", "file-agents", "allow-client-alice-extract"}, names
        assert await etcd.get(b"/hivemesh/policies/authz/allow-client-alice-extract") is not None
        async with ControlPlaneClient(restarted.address, alice, TRUST_DOMAIN) as client:
            assert list((await client.issue_token(EXTRACTOR, ["extract"])).scopes) == ["extract"]

        # A second replica with the same file (the README's external-etcd replicas) writes no grant at all.
        before = await _grant_revisions(etcd)
        async with _controlplane(config) as _second:
            assert await _grant_revisions(etcd) == before


async def test_a_grant_dropped_from_the_file_is_deleted_only_while_it_holds_what_the_file_wrote(
    etcd: aetcd.Client, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    copy_session_ca(tmp_path / "certs")
    grants_file = tmp_path / "grants.yaml"
    config = ControlPlaneConfig(etcd_endpoints=etcd_server.endpoint, certs_dir=tmp_path / "certs",
                                state_dir=tmp_path / "state", trust_domain=TRUST_DOMAIN, grants_file=grants_file,
                                grace_s=0, metrics_listen="off")

    def write_file(*names: str) -> None:
        grants = [{"name": n, "subjects": [f"{TD}/client/{n}"], "capabilities": ["extract"]} for n in names]
        grants_file.write_text(yaml.safe_dump({"grants": grants}))

    write_file("one", "two", "three")
    async with _controlplane(config):
        assert await _grant_names(etcd) == {"one", "two", "three"}
    # An operator's own grant, and a file grant the operator then edited: both theirs now.
    await apply_policies_text(etcd_server.endpoint, f"""
kind: grants
name: operators-own
spec: {{subjects: ["{TD}/client/bob"], capabilities: ["extract"]}}
---
kind: grants
name: three
description: edited by an operator
spec: {{subjects: ["{TD}/client/three"], capabilities: ["extract", "summarize"]}}
""")

    write_file("one")  # two and three leave the file
    async with _controlplane(config):
        # two: the file wrote it and nobody changed it, so it goes; three was edited since, so it stays.
        assert await _grant_names(etcd) == {"one", "three", "operators-own"}
        kept = await etcd.get(b"/hivemesh/grants/three")
        assert kept is not None and b"edited by an operator" in kept.value

    write_file("one", "two")  # back in the file: written again
    async with _controlplane(config):
        assert await _grant_names(etcd) == {"one", "two", "three", "operators-own"}
    write_file()  # an empty file: every grant it wrote goes, no other
    async with _controlplane(config):
        assert await _grant_names(etcd) == {"three", "operators-own"}
