"""A workload never approves its own escalation: against a real control plane, etcd and TLS.

An escalation's `answerer` is the principal a requester (an A2A gateway) relays for: the requester resolves with
that principal's token addressed to it. A workload named itself as answerer, got a token addressed to itself
(`IssueToken(audience=itself)`, which a grant on `agent/*` allows: sub = aud) and relayed it: APPROVED, resolved by
itself on behalf of itself, though only operators resolve. Now naming the requester as answerer is
INVALID_ARGUMENT naming the field (an operator may: it resolves anyway), and a relay answering for the requester
is PERMISSION_DENIED, also for an escalation stored that way before. A designated answerer's relayed reply and an
operator's answer go on as before.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from hivemesh.controlplane.escalations import PREFIX
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import HivemeshError, InvalidInputError
from hivemesh.mesh.tls import Workload, join
from hivemesh.sdk.escalation import EscalationClient
from hivemesh.v1 import escalation_pb2 as pb
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv

pytestmark = pytest.mark.timeout(120)
OPERATOR = f"spiffe://{TRUST_DOMAIN}/operator/admin"


@pytest.fixture
async def joined(mesh_env: MeshEnv) -> AsyncIterator[dict[str, tuple[Workload, ControlPlaneClient]]]:
    """mallory and the gateway are agents (tokens are addressed to agents, so only an agent relays); alice is the
    client a gateway relays for."""
    out: dict[str, tuple[Workload, ControlPlaneClient]] = {}
    try:
        for name, kind in (("mallory", "agent"), ("gateway", "agent"), ("alice", "client")):
            token = (await mesh_env.operator.create_join_token(name, kind, 120)).token
            w = await join(mesh_env.controlplane.join_address, mesh_env.certs.ca_cert.read_bytes(), token, name,
                           kind, trust_domain=TRUST_DOMAIN)
            out[name] = (w, ControlPlaneClient(mesh_env.controlplane.address, w, TRUST_DOMAIN))
        yield out
    finally:
        for _, cp in out.values():
            await cp.close()


async def test_a_workload_cannot_approve_its_own_escalation(
    mesh_env: MeshEnv, joined: dict[str, tuple[Workload, ControlPlaneClient]]
) -> None:
    mallory_w, mallory_cp = joined["mallory"]
    mallory = EscalationClient(mallory_cp)
    operator = EscalationClient(mesh_env.operator.channel)
    # The attack as reported: name itself, get a token addressed to itself, relay it.
    with pytest.raises(InvalidInputError) as refused:
        await mallory.create("wire the money?", escalation_id="esc-self", answerer=mallory_w.spiffe_id)
    assert "answerer" in refused.value.field_violations, refused.value.field_violations
    assert "requester" in refused.value.message and mallory_w.spiffe_id in refused.value.message
    own_token = (await mallory_cp.issue_token(mallory_w.spiffe_id, ["echo"])).token  # sub = aud = mallory
    assert not await operator.list()  # nothing stored: the create was refused whole
    # Its own escalation naming someone else: its own token still answers nothing.
    alice = joined["alice"][0].spiffe_id
    asked = await mallory.create("wire the money?", escalation_id="esc-other", answerer=alice)
    with pytest.raises(HivemeshError) as relayed:
        await mallory.resolve(asked.id, approve=True, subject_token=own_token)
    assert relayed.value.code == grpc.StatusCode.PERMISSION_DENIED, repr(relayed.value)
    assert (await operator.get(asked.id)).pending


async def test_an_escalation_stored_naming_its_requester_is_not_answered_by_the_requester(
    mesh_env: MeshEnv, etcd: Any, joined: dict[str, tuple[Workload, ControlPlaneClient]]
) -> None:
    """One stored before creation refused it (written as the control plane did then): the relay is refused."""
    mallory_w, mallory_cp = joined["mallory"]
    stored = pb.Escalation(
        id="esc-old", reason="wire the money?", context_json="{}", requested_by=mallory_w.spiffe_id,
        created_at_unix_ms=int(time.time() * 1000), on_deadline=pb.DEADLINE_POLICY_REJECT,
        status=pb.ESCALATION_STATUS_PENDING, answerer=mallory_w.spiffe_id,
    )
    await etcd.put((PREFIX + "esc-old").encode(), stored.SerializeToString())
    own_token = (await mallory_cp.issue_token(mallory_w.spiffe_id, ["echo"])).token
    with pytest.raises(HivemeshError) as refused:
        await EscalationClient(mallory_cp).resolve("esc-old", approve=True, answer="yes", subject_token=own_token)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED, repr(refused.value)
    assert "its own escalation" in refused.value.message and "operator" in refused.value.message
    operator = EscalationClient(mesh_env.operator.channel)
    assert (await operator.get("esc-old")).pending
    # An operator answers it, as any other.
    done = await operator.resolve("esc-old", approve=False, note="no")
    assert (done.status, done.resolved_by, done.on_behalf_of) == ("REJECTED", OPERATOR, "")


async def test_a_designated_answerer_and_an_operator_still_answer(
    mesh_env: MeshEnv, joined: dict[str, tuple[Workload, ControlPlaneClient]]
) -> None:
    gateway_w, gateway_cp = joined["gateway"]
    alice_w, alice_cp = joined["alice"]
    gateway = EscalationClient(gateway_cp)
    operator = EscalationClient(mesh_env.operator.channel)
    asked = await gateway.create("refund?", escalation_id="esc-relay", answerer=alice_w.spiffe_id)
    alices = (await alice_cp.issue_token(gateway_w.spiffe_id, ["echo"])).token
    done = await gateway.resolve(asked.id, approve=True, answer="yes", subject_token=alices)
    assert (done.approved, done.resolved_by, done.on_behalf_of) == (True, gateway_w.spiffe_id, alice_w.spiffe_id)
    # An operator may name itself (it resolves anyway) and answers its own escalation.
    mine = await operator.create("restart the cluster?", escalation_id="esc-op", answerer=OPERATOR)
    assert mine.answerer == OPERATOR
    assert (await operator.resolve(mine.id, approve=True)).resolved_by == OPERATOR
