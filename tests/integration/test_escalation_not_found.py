"""Another principal's escalation is, to a workload, one that does not exist: against a real control plane and etcd.

Ids are scoped per requester (`escalations.scoped_id`): a requester's plain id names its own scoped escalation if it
has one, else the plain id, which may be another requester's. When a workload's own scoped escalation was gone
(deleted by retention, or never created), its Get of the plain id reached the other requester's escalation and was
refused PERMISSION_DENIED ("may read only the escalations it created"): untrue (its own is simply not there) and a
leak (someone else holds that id). Get, Wait, Cancel and a relayed Resolve now answer exactly as for an id nobody
holds: NOT_FOUND "no escalation '<id>'" with the id as metadata, while the audit log keeps what really happened.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane import escalations
from hivemesh.controlplane.retention import Retention
from hivemesh.controlplane.retention_config import RetentionConfig
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import HivemeshError, NotFoundError
from hivemesh.mesh.tls import Workload, join
from hivemesh.sdk.escalation import EscalationClient, EscalationInfo
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(120)


class Rig:
    """alice and carol are clients; bob is an agent (tokens are addressed to agents, so only an agent relays)."""

    def __init__(self, env: MeshEnv, joined: dict[str, tuple[Workload, ControlPlaneClient]]) -> None:
        self.env = env
        self.joined = joined
        self.alice = EscalationClient(joined["alice"][1])
        self.bob = EscalationClient(joined["bob"][1])
        self.operator = EscalationClient(env.operator.channel)

    def sid(self, name: str) -> str:
        return self.joined[name][0].spiffe_id


@pytest.fixture
async def rig(mesh_env: MeshEnv) -> AsyncIterator[Rig]:
    joined: dict[str, tuple[Workload, ControlPlaneClient]] = {}
    try:
        for name, kind in (("alice", "client"), ("bob", "agent"), ("carol", "client")):
            token = (await mesh_env.operator.create_join_token(name, kind, 120)).token
            w = await join(mesh_env.controlplane.join_address, mesh_env.certs.ca_cert.read_bytes(), token, name,
                           kind, trust_domain=TRUST_DOMAIN)
            joined[name] = (w, ControlPlaneClient(mesh_env.controlplane.address, w, TRUST_DOMAIN))
        yield Rig(mesh_env, joined)
    finally:
        for _, cp in joined.values():
            await cp.close()


async def _refusal(call: Awaitable[EscalationInfo]) -> HivemeshError:
    with pytest.raises(HivemeshError) as refused:
        await call
    return refused.value


def _is_not_found(err: HivemeshError, asked: str) -> None:
    """Exactly what an id nobody holds gets: NOT_FOUND, "no escalation '<id>'", the id as metadata."""
    assert isinstance(err, NotFoundError), repr(err)
    assert (err.message, err.metadata) == (f"no escalation {asked!r}", {"id": asked}), repr(err)


async def _as_for_nobodys(rig: Rig, rpc: Callable[[str], Awaitable[EscalationInfo]], asked: str) -> None:
    """rpc(asked) is refused exactly as rpc of an id that nobody holds (same shape, only the id differs)."""
    _is_not_found(await _refusal(rpc(asked)), asked)
    _is_not_found(await _refusal(rpc("esc-nobodys")), "esc-nobodys")


async def test_a_get_of_a_plain_id_whose_own_scoped_escalation_retention_deleted_is_not_found(
    rig: Rig, etcd: Any
) -> None:
    await rig.alice.create("alice asks", escalation_id="esc-x")
    bobs = await rig.bob.create("bob asks the same id", escalation_id="esc-x")
    assert bobs.id == escalations.scoped_id("esc-x", rig.sid("bob"))
    await rig.bob.cancel("esc-x", note="done with it")
    # The real retention pass deletes bob's resolved escalation; alice's, pending, is kept.
    report = await Retention(etcd, RetentionConfig(history_s=None, workflows_s=None, escalations_s=0,
                                                   revocations_s=None), clock=lambda: time.time() + 5).run_once()
    assert report.escalations == [bobs.id]
    assert await etcd.get(f"{escalations.PREFIX}{bobs.id}".encode()) is None
    # The old control plane located bob's "esc-x" to alice's and answered PERMISSION_DENIED.
    await _as_for_nobodys(rig, rig.bob.get, "esc-x")
    assert (await rig.alice.get("esc-x")).pending  # alice's own, untouched
    assert (await rig.operator.get("esc-x")).requested_by == rig.sid("alice")  # operators see everything


async def test_a_get_of_another_principals_plain_id_that_was_never_asked_for_is_not_found(rig: Rig) -> None:
    await rig.alice.create("alice asks", escalation_id="esc-x")
    await _as_for_nobodys(rig, rig.bob.get, "esc-x")
    assert [e.id for e in await rig.bob.list()] == []  # the listing, filtered by requester, agrees


async def test_a_wait_on_another_principals_escalation_is_not_found(rig: Rig) -> None:
    await rig.alice.create("alice asks", escalation_id="esc-x")
    await _as_for_nobodys(rig, lambda asked: rig.bob.wait(asked, timeout=5), "esc-x")
    assert (await rig.alice.get("esc-x")).pending


async def test_a_cancel_of_another_principals_escalation_is_not_found_and_changes_nothing(rig: Rig) -> None:
    await rig.alice.create("alice asks", escalation_id="esc-x")
    await _as_for_nobodys(rig, lambda asked: rig.bob.cancel(asked, note="mine now"), "esc-x")
    assert (await rig.alice.get("esc-x")).pending


async def test_a_relayed_resolve_of_another_principals_escalation_is_not_found_and_changes_nothing(rig: Rig) -> None:
    """A relayer (bob, an agent) holding a genuine token addressed to it probes another's escalation."""
    await rig.alice.create("alice asks", escalation_id="esc-x", answerer=rig.sid("carol"))
    carols = (await rig.joined["carol"][1].issue_token(rig.sid("bob"), ["echo"])).token
    await _as_for_nobodys(rig, lambda asked: rig.bob.resolve(asked, approve=True, subject_token=carols), "esc-x")
    assert (await rig.alice.get("esc-x")).pending
    # A relayer's own escalation keeps its rules: one that names no answerer is still refused as before.
    own = await rig.bob.create("bob asks", escalation_id="esc-own")
    refused = await _refusal(rig.bob.resolve(own.id, approve=True, subject_token=carols))
    assert refused.reason == "PERMISSION_DENIED" and "names an answerer" in refused.message, repr(refused)


@pytest.mark.parametrize("rpc", ["get", "wait", "cancel", "resolve"])
async def test_another_principals_scoped_id_named_explicitly_is_not_found(rig: Rig, rpc: str) -> None:
    await rig.bob.create("bob holds the plain id", escalation_id="esc-x")
    alices = await rig.alice.create("alice asks the same id", escalation_id="esc-x", answerer=rig.sid("carol"))
    assert alices.id == escalations.scoped_id("esc-x", rig.sid("alice"))  # computable by anyone
    carols = (await rig.joined["carol"][1].issue_token(rig.sid("bob"), ["echo"])).token
    calls: dict[str, Callable[[str], Awaitable[EscalationInfo]]] = {
        "get": rig.bob.get,
        "wait": lambda asked: rig.bob.wait(asked, timeout=5),
        "cancel": lambda asked: rig.bob.cancel(asked),
        "resolve": lambda asked: rig.bob.resolve(asked, approve=True, subject_token=carols),
    }
    await _as_for_nobodys(rig, calls[rpc], alices.id)
    assert (await rig.alice.get("esc-x")).pending
    assert (await rig.operator.get(alices.id)).pending


async def test_the_audit_log_says_whose_escalation_a_not_found_refused(rig: Rig, tmp_path: Path) -> None:
    """The caller is told only NOT_FOUND; the log (operators' reading) says it was another principal's."""
    await rig.alice.create("alice asks", escalation_id="esc-x")
    _is_not_found(await _refusal(rig.bob.get("esc-x")), "esc-x")
    log = tmp_path / "cp-state" / "audit" / "log.jsonl"

    def records() -> list[dict[str, Any]]:
        return [json.loads(line)["record"] for line in log.read_text().splitlines()]

    # Recorded before the answer is released (durably, as every escalation record).
    refused = [r for r in records() if r.get("event") == "escalation" and r.get("action") == "refused"]
    assert len(refused) == 1, refused
    got = refused[0]
    assert (got["id"], got["requested_by"], got["actor"], got["caller"]) == (
        "esc-x", rig.sid("alice"), rig.sid("bob"), rig.sid("bob"))
    assert (got["rpc"], got["decision"], got["answered"], got["status"]) == (
        "Escalations/GetEscalation", "deny", "NOT_FOUND", "PENDING")
    assert "another principal" in got["message"]
    # The RPC's own record (the audit interceptor's, which may land just after an error answer) says what the
    # caller was told.

    def rpc_records() -> list[tuple[str, str]]:
        return [(r["status"], r.get("message", "")) for r in records()
                if r.get("method") == got["rpc"] and r.get("caller") == rig.sid("bob")]

    assert await until(lambda: bool(rpc_records()), 10), "no audit record of bob's GetEscalation"
    assert rpc_records() == [("NOT_FOUND", "no escalation 'esc-x'")]
