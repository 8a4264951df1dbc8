"""Which registered nodes a CA rotation's `finish` waits for (the entries' certificate labels), without etcd."""

from __future__ import annotations

import pytest

from hivemesh.controlplane.ca_stragglers import refuse_if_stranding, stragglers
from hivemesh.mesh.cert_presence import CERT_NOT_AFTER_LABEL, CERT_ROOT_LABEL
from hivemesh.mesh.errors import FailedPreconditionError
from hivemesh.v1 import agent_pb2, mesh_pb2

NEW, OLD = "a" * 64, "b" * 64


def _inst(agent: str, instance: str, labels: dict[str, str]) -> mesh_pb2.AgentInstance:
    return mesh_pb2.AgentInstance(card=agent_pb2.AgentCard(name=agent), instance_id=instance, endpoint="h:1",
                                  identity=f"spiffe://td/agent/{agent}", labels=labels)


def test_only_nodes_off_the_signing_root_are_stragglers() -> None:
    entries = [
        _inst("b", "2", {CERT_ROOT_LABEL: OLD, CERT_NOT_AFTER_LABEL: "123"}),
        _inst("a", "1", {CERT_ROOT_LABEL: NEW, CERT_NOT_AFTER_LABEL: "456"}),
        _inst("c", "3", {}),  # predates the labels: cannot be shown to have renewed
    ]
    found = stragglers(entries, NEW)
    assert [(s.agent, s.root, s.not_after) for s in found] == [("b", OLD, 123), ("c", "", 0)]
    with pytest.raises(FailedPreconditionError) as refused:
        refuse_if_stranding(entries, NEW)
    assert "2 registered node(s)" in str(refused.value) and "b/2" in str(refused.value)
    assert "c/3" in str(refused.value) and "a/1" not in str(refused.value)
    refuse_if_stranding(entries[1:2], NEW)  # everyone renewed: no refusal
    refuse_if_stranding([], NEW)


def test_a_refusal_names_at_most_ten_and_counts_all() -> None:
    entries = [_inst(f"n{i:02d}", "x", {CERT_ROOT_LABEL: OLD}) for i in range(14)]
    with pytest.raises(FailedPreconditionError) as refused:
        refuse_if_stranding(entries, NEW)
    assert "14 registered node(s)" in str(refused.value) and "and 4 more" in str(refused.value)
