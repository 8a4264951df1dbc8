"""The outbound path's per-instance memory of what a card declares: the same answers a scan of the card gives,
and a changed registry entry (a new instance object) read afresh."""

from __future__ import annotations

from hivemesh.mesh.outbound import card_flags
from hivemesh.mesh.outbound.call import idempotent
from hivemesh.mesh.outbound.card_flags import CapabilityFlags, capability_flags
from hivemesh.mesh.outbound.signed import signs
from hivemesh.v1 import agent_pb2, mesh_pb2


def _instance(*caps: agent_pb2.Capability, instance_id: str = "i1") -> mesh_pb2.AgentInstance:
    return mesh_pb2.AgentInstance(instance_id=instance_id, card=agent_pb2.AgentCard(name="a", capabilities=caps))


def test_flags_are_what_the_card_declares() -> None:
    inst = _instance(
        agent_pb2.Capability(name="plain"),
        agent_pb2.Capability(name="safe", idempotent=True),
        agent_pb2.Capability(name="sealed", signed_payloads=True),
        agent_pb2.Capability(name="both", idempotent=True, signed_payloads=True),
    )
    assert capability_flags(inst, "plain") == CapabilityFlags(idempotent=False, signed=False)
    assert capability_flags(inst, "safe") == CapabilityFlags(idempotent=True, signed=False)
    assert capability_flags(inst, "sealed") == CapabilityFlags(idempotent=False, signed=True)
    assert capability_flags(inst, "both") == CapabilityFlags(idempotent=True, signed=True)
    assert capability_flags(inst, "unlisted") == CapabilityFlags(idempotent=False, signed=False)
    # The pipeline's own questions give the same answers.
    assert [idempotent(inst, c) for c in ("plain", "safe", "sealed", "both")] == [False, True, False, True]
    assert [signs(inst, c) for c in ("plain", "safe", "sealed", "both")] == [False, False, True, True]


def test_a_name_listed_twice_counts_either_declaration() -> None:
    inst = _instance(agent_pb2.Capability(name="x"), agent_pb2.Capability(name="x", idempotent=True,
                                                                               signed_payloads=True))
    assert capability_flags(inst, "x") == CapabilityFlags(idempotent=True, signed=True)


def test_a_changed_entry_is_read_afresh() -> None:
    old = _instance(agent_pb2.Capability(name="work"))
    assert not idempotent(old, "work") and not signs(old, "work")
    new = _instance(agent_pb2.Capability(name="work", idempotent=True, signed_payloads=True))  # re-registered
    assert idempotent(new, "work") and signs(new, "work")
    assert not idempotent(old, "work")  # each object keeps its own answers


def test_memory_is_bounded_and_starts_over() -> None:
    card_flags._seen.clear()
    kept = [_instance(agent_pb2.Capability(name="c", idempotent=True), instance_id=f"i{n}")
            for n in range(card_flags._MAX_INSTANCES + 5)]
    for inst in kept:
        assert idempotent(inst, "c")
    assert len(card_flags._seen) <= card_flags._MAX_INSTANCES
    assert idempotent(kept[0], "c")  # forgotten, then read again
