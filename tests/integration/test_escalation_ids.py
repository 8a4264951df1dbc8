"""Escalation ids and who answered, against a real control plane and etcd.

Ids were global: a workflow run's escalation id is derived from its run id and step id
(`escalation_id_for`), so any workload that knew a run's id could create that escalation first, and the run's
own escalation was then PERMISSION_DENIED ("belongs to another caller") and the run failed. An id is now each
requester's own: another requester's escalation under the same id gets a stored id of its own (the id, '@', a
hash of the requester), which operators list and answer, while its requester still addresses it by the id it
asked for. Escalations stored before (under the plain id) are listed, answered and resolved as they were.

A relayed answer (the requester relaying its named answerer's reply with that answerer's token) was recorded as
the answerer's own, though the token only shows the answerer once called the requester: any workload holding a
token a caller sent it could approve its own escalation in that caller's name. It is now recorded as the
relayer's (the caller the control plane verified), on behalf of the answerer, marked as claimed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane import escalations
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import InvalidInputError, NotFoundError
from hivemesh.mesh.tls import Workload, join
from hivemesh.sdk.escalation import EscalationClient
from hivemesh.sdk.patterns import Pipeline, Step
from hivemesh.sdk.workflow import WorkflowEngine, escalation_id_for
from hivemesh.v1 import escalation_pb2 as pb
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, run_cli
from tests.support.orch_agents import DeskAgent
from tests.support.orch_env import Orch, wait_until

pytestmark = pytest.mark.timeout(120)
OPERATOR = f"spiffe://{TRUST_DOMAIN}/operator/admin"


async def _joined(env: MeshEnv, name: str, kind: str) -> tuple[Workload, ControlPlaneClient]:
    token = (await env.operator.create_join_token(name, kind, 120)).token
    w = await join(env.controlplane.join_address, env.certs.ca_cert.read_bytes(), token, name, kind,
                   trust_domain=TRUST_DOMAIN)
    return w, ControlPlaneClient(env.controlplane.address, w, TRUST_DOMAIN)


@pytest.fixture
async def clients(mesh_env: MeshEnv) -> AsyncIterator[dict[str, tuple[Workload, ControlPlaneClient]]]:
    """Three workloads of the mesh_env, by name: two clients and an agent (a relayer must be an agent: tokens
    are addressed to agents)."""
    out: dict[str, tuple[Workload, ControlPlaneClient]] = {}
    try:
        for name, kind in (("owner", "client"), ("other", "client"), ("gateway", "agent")):
            out[name] = await _joined(mesh_env, name, kind)
        yield out
    finally:
        for _, cp in out.values():
            await cp.close()


def _cli_json(result: tuple[int, str, str]) -> Any:
    code, stdout, stderr = result
    assert code == 0, stderr[-2000:]
    return json.loads(stdout)


async def test_a_run_whose_escalation_id_was_taken_first_still_asks_and_is_answered(orch: Orch) -> None:
    await orch.serve(DeskAgent())
    run_id, step_id = "client-orchestrator/wf-squat", "01-approve-refund"
    taken = escalation_id_for(run_id, step_id)  # all it takes to know: the run's id, which is no secret
    squatting = await orch.client("squatter")
    squatter = EscalationClient(squatting.node.controlplane)
    squat = await squatter.create("approve me instead", escalation_id=taken, workflow_id=run_id, step_id=step_id)
    assert squat.id == taken
    operator = EscalationClient(orch.env.operator.channel)
    asker = EscalationClient(orch.mesh.node.controlplane)
    async with WorkflowEngine(orch.mesh) as engine:
        handle = await engine.submit(Pipeline([Step("approve-refund")]), {"question": "refund order 7"},
                                     workflow_id="wf-squat")

        async def asked_or_ended() -> Any:
            state = await engine.get("wf-squat")
            return state if state.state in ("INPUT_REQUIRED", "FAILED", "COMPLETED") else None

        state = await wait_until(asked_or_ended, 30, "the run to ask a person (or fail)")
        # The old control plane failed the run here: PERMISSION_DENIED on its own escalation's id.
        assert state.state == "INPUT_REQUIRED", json.dumps(state.to_json().get("error"))
        listed = await operator.list("PENDING", run_id)
        assert len(listed) == 2 and len({e.id for e in listed}) == 2  # operators tell them apart by id
        ours = next(e for e in listed if e.requested_by == orch.mesh.node.workload.spiffe_id)
        assert ours.id != taken and ours.id.startswith(taken + "@") and ours.reason.startswith("a refund")
        assert state.escalations[step_id]["escalation_id"] == ours.id  # the run shows the id operators see
        # Each requester's plain id is its own escalation; the scoped id is its requester's alone: to anyone else
        # (not an operator) it does not exist, and is answered as an id nobody holds.
        assert (await asker.get(taken)).id == ours.id
        assert (await squatter.get(taken)).reason == "approve me instead"
        with pytest.raises(NotFoundError, match=re.escape(f"no escalation {ours.id!r}")):
            await squatter.get(ours.id)
        with pytest.raises(NotFoundError, match=re.escape(f"no escalation {ours.id!r}")):
            await squatter.cancel(ours.id)
        with pytest.raises(InvalidInputError, match="escalation id"):  # nobody asks for a scoped id
            await squatter.create("mine now", escalation_id=ours.id)
        # The operator answers it with the real CLI, by the id it listed; the run resumes with the answer.
        shown = _cli_json(await run_cli(orch.env, "escalations", "show", ours.id, "--json"))
        assert shown["requested_by"] == orch.mesh.node.workload.spiffe_id
        approved = _cli_json(await run_cli(orch.env, "escalations", "approve", ours.id, "--answer", "yes",
                                           "--note", "fine", "--json"))
        assert approved["id"] == ours.id and approved["status"] == "APPROVED"
        done = await handle.result(timeout=30)
    assert done.state == "COMPLETED" and done.output["output"] == {"refunded": True, "answer": "yes", "note": "fine"}
    still = await squatter.get(taken)
    assert still.pending and still.requested_by == squatting.node.workload.spiffe_id


async def test_escalations_stored_before_ids_were_scoped_are_listed_answered_and_resolved(
    mesh_env: MeshEnv, etcd: Any, clients: dict[str, tuple[Workload, ControlPlaneClient]]
) -> None:
    owner_w, owner_cp = clients["owner"]
    other_w, other_cp = clients["other"]
    owner, other = EscalationClient(owner_cp), EscalationClient(other_cp)
    operator = EscalationClient(mesh_env.operator.channel)
    # As the old control plane stored it: under /hivemesh/escalations/<id>, the plain id.
    legacy = pb.Escalation(
        id="esc-legacy", reason="approve the old refund", context_json="{}", requested_by=owner_w.spiffe_id,
        workflow_id="wf-old", step_id="s1", created_at_unix_ms=int(time.time() * 1000) - 60_000,
        on_deadline=pb.DEADLINE_POLICY_REJECT, status=pb.ESCALATION_STATUS_PENDING)
    await etcd.put(b"/hivemesh/escalations/esc-legacy", legacy.SerializeToString())

    again = await owner.create("asked again after a restart", escalation_id="esc-legacy")  # idempotent as before
    assert (again.id, again.reason, again.created_at) == ("esc-legacy", legacy.reason, legacy.created_at_unix_ms / 1000)
    theirs = await other.create("the same id, another requester", escalation_id="esc-legacy", workflow_id="wf-old")
    assert theirs.id.startswith("esc-legacy@") and theirs.requested_by == other_w.spiffe_id
    assert (await other.create("again", escalation_id="esc-legacy")).id == theirs.id  # idempotent per requester

    listed = _cli_json(await run_cli(mesh_env, "escalations", "list", "--workflow", "wf-old", "--json"))
    assert sorted(e["id"] for e in listed) == sorted(["esc-legacy", theirs.id])
    approved = _cli_json(await run_cli(mesh_env, "escalations", "approve", "esc-legacy", "--note", "ok", "--json"))
    assert approved["status"] == "APPROVED" and approved["reason"] == legacy.reason
    waited = await owner.wait("esc-legacy", timeout=10)
    assert waited.approved and waited.resolved_by == OPERATOR and waited.note == "ok"
    assert (await other.get("esc-legacy")).pending  # the other requester's is its own, untouched
    canceled = await other.cancel("esc-legacy", note="not needed")
    assert canceled.id == theirs.id and canceled.status == "CANCELED"
    assert (await operator.get("esc-legacy")).approved
    assert {e.id for e in await owner.list()} == {"esc-legacy"}
    assert {e.id for e in await other.list()} == {theirs.id}
    kept = await etcd.get(b"/hivemesh/escalations/esc-legacy")  # not moved: older readers find it where it was
    assert pb.Escalation.FromString(kept.value).status == pb.ESCALATION_STATUS_APPROVED


async def test_a_relayed_answer_is_the_relayers_on_behalf_of_the_answerer_it_names(
    mesh_env: MeshEnv, tmp_path: Path, clients: dict[str, tuple[Workload, ControlPlaneClient]]
) -> None:
    gateway_w, gateway_cp = clients["gateway"]
    alice_w, alice_cp = clients["owner"]
    gateway = EscalationClient(gateway_cp)
    heard: list[tuple[str, str, str]] = []

    def hook(action: str, esc: pb.Escalation, actor: str) -> None:
        heard.append((action, esc.id, actor))

    escalations.add_audit_hook(hook)
    try:
        # alice only called the gateway's echo: a token she sent it for that, and nothing about any escalation.
        alices = (await alice_cp.issue_token(gateway_w.spiffe_id, ["echo"])).token
        asked = await gateway.create("wire the money?", escalation_id="esc-relay", answerer=alice_w.spiffe_id)
        done = await gateway.resolve(asked.id, approve=True, answer="yes", subject_token=alices)
        # Recorded as the gateway's answer, which the control plane verified; alice is only the one it claims.
        assert done.approved and done.resolved_by == gateway_w.spiffe_id
        assert (done.on_behalf_of, done.on_behalf_of_claimed) == (alice_w.spiffe_id, True)
        stored = await EscalationClient(mesh_env.operator.channel).get("esc-relay")
        assert (stored.resolved_by, stored.on_behalf_of, stored.on_behalf_of_claimed) == (
            gateway_w.spiffe_id, alice_w.spiffe_id, True)
        assert ("approved", "esc-relay", gateway_w.spiffe_id) in heard
        log = tmp_path / "cp-state" / "audit" / "log.jsonl"
        records = [json.loads(line)["record"] for line in log.read_text().splitlines()]
        approved = [r for r in records if r.get("event") == "escalation" and r.get("action") == "approved"]
        assert [(r["actor"], r.get("on_behalf_of")) for r in approved] == [(gateway_w.spiffe_id, alice_w.spiffe_id)]
        # An operator's answer is the operator's, on behalf of nobody.
        second = await gateway.create("and this one?", escalation_id="esc-relay-2", answerer=alice_w.spiffe_id)
        by_op = await EscalationClient(mesh_env.operator.channel).resolve(second.id, approve=False)
        assert (by_op.resolved_by, by_op.on_behalf_of, by_op.on_behalf_of_claimed) == (OPERATOR, "", False)
    finally:
        escalations.remove_audit_hook(hook)


async def test_an_operators_escalation_of_an_id_a_workload_took_first_is_the_operators_own(
    mesh_env: MeshEnv, clients: dict[str, tuple[Workload, ControlPlaneClient]]
) -> None:
    """A run resumed by an operator (`hivemesh workflows resume`) asks as the operator: it was handed the squatter's
    escalation of the same id, which the squatter then answered (relaying an accomplice's token) into the run."""
    (squat_w, squat_cp), (accomplice_w, accomplice_cp) = clients["gateway"], clients["other"]
    squatter = EscalationClient(squat_cp)
    operator = EscalationClient(mesh_env.operator.channel)
    taken = escalation_id_for("operator-admin/wf-1", "01-approve-refund")
    await squatter.create("squatted", escalation_id=taken, answerer=accomplice_w.spiffe_id)
    mine = await operator.create("refund order 7?", escalation_id=taken)
    assert mine.requested_by != squat_w.spiffe_id and mine.reason == "refund order 7?", mine
    assert mine.id == escalations.scoped_id(taken, mine.requested_by), mine.id
    assert (await operator.create("refund order 7?", escalation_id=taken)).id == mine.id  # idempotent
    relayed = (await accomplice_cp.issue_token(squat_w.spiffe_id, ["echo"])).token
    await squatter.resolve(taken, approve=True, answer={"refund": 1000000}, subject_token=relayed)
    assert (await operator.get(mine.id)).pending  # the squatter answered its own, not the operator's
