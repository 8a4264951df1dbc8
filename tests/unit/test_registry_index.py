"""The registry's index, kept up to date change by change, is always the index built from scratch."""

from __future__ import annotations

import random
from types import MappingProxyType

from hivemesh.mesh.registry import CapabilityInfo, Departed, _Index, _IndexBuilder, agent_key
from hivemesh.v1 import agent_pb2, mesh_pb2


def instance(agent: str, instance_id: str, caps: list[str], version: str = "1.0.0") -> mesh_pb2.AgentInstance:
    card = agent_pb2.AgentCard(name=agent, version=version,
                               capabilities=[agent_pb2.Capability(name=c, description=f"{c} by {agent}") for c in caps])
    return mesh_pb2.AgentInstance(card=card, instance_id=instance_id, endpoint="127.0.0.1:9")


def reference(snapshot: dict[str, mesh_pb2.AgentInstance]) -> _Index:
    """The index as RegistryView built it on every change before it was incremental."""
    insts = sorted(snapshot.values(), key=lambda i: (i.card.name, i.instance_id))
    groups: dict[str, list[mesh_pb2.AgentInstance]] = {}
    for inst in insts:
        for cap in inst.card.capabilities:
            groups.setdefault(cap.name, []).append(inst)
    by_cap = {name: tuple(sorted(g, key=lambda i: i.instance_id)) for name, g in groups.items()}
    infos = []
    for name in sorted(groups):
        first = groups[name][0]
        decl = next(c for c in first.card.capabilities if c.name == name)
        infos.append(CapabilityInfo(decl, tuple(sorted({i.card.name for i in groups[name]})), len(groups[name])))
    return _Index(by_cap, tuple(insts), tuple(infos))


def test_incremental_updates_match_a_full_rebuild() -> None:
    rng = random.Random(14)
    agents = [f"agent-{c}" for c in "abcdefgh"] + ["agent", "agent-a.b", "agent.a"]  # '-', '.' sort before '/'
    caps = [f"cap-{i}" for i in range(12)]
    builder = _IndexBuilder()
    snapshot: dict[str, mesh_pb2.AgentInstance] = {}
    incremental = 0
    for step in range(150):
        snapshot = dict(snapshot)  # a published snapshot is never mutated: each step makes a new one
        for _ in range(rng.choice([1, 1, 1, 2, 3, 40])):
            agent = rng.choice(agents)
            key_id = f"i{rng.randrange(30)}"
            key = agent_key(agent, key_id)
            if key in snapshot and rng.random() < 0.4:
                del snapshot[key]
            else:  # a new instance, or a re-registration with other capabilities or another card
                snapshot[key] = instance(agent, key_id, rng.sample(caps, rng.randint(1, 3)), f"1.{step}.0")
        kept = dict(builder._by_cap)  # to tell which path the update took
        got = builder.update(MappingProxyType(snapshot))
        incremental += any(got.by_capability.get(c) is t for c, t in kept.items())  # untouched entries were kept
        want = reference(snapshot)
        assert got.by_capability == want.by_capability, f"step {step}"
        assert got.all == want.all, f"step {step}"
        assert got.capabilities == want.capabilities, f"step {step}"
    assert incremental > 75  # most updates took the incremental path


def test_the_capabilities_an_update_leaves_unserved_are_named_on_either_path() -> None:
    """What NO_LIVE_INSTANCE rests on: every capability served once and not now is in Departed, whether the update
    that emptied it was incremental or a rebuild from scratch (a small mesh, so capabilities come and go often)."""
    rng = random.Random(7)
    caps = [f"cap-{i}" for i in range(20)]
    builder, departed = _IndexBuilder(), Departed()
    snapshot: dict[str, mesh_pb2.AgentInstance] = {}
    ever: set[str] = set()
    emptied_by = {"incremental": 0, "rebuild": 0}
    for step in range(300):
        snapshot = dict(snapshot)
        changes = rng.choice([1, 1, 2, 6])
        for _ in range(changes):
            agent, key_id = rng.choice("abc"), f"i{rng.randrange(4)}"
            key = agent_key(agent, key_id)
            if key in snapshot and rng.random() < 0.5:
                del snapshot[key]
            else:
                snapshot[key] = instance(agent, key_id, rng.sample(caps, rng.randint(1, 3)))
        before = len(snapshot)
        served = set(builder.update(MappingProxyType(snapshot)).by_capability)
        departed.note(builder.emptied)  # what RegistryView does with it
        assert not set(builder.emptied) & served, f"step {step}"
        if builder.emptied:
            emptied_by["rebuild" if changes * 8 > before else "incremental"] += 1
        ever |= served
        assert {c for c in caps if c in departed and c not in served} == ever - served, f"step {step}"
    assert min(emptied_by.values()) > 10, emptied_by


def test_departed_capabilities_are_remembered_newest_first_up_to_a_bound() -> None:
    """A workload registering ever new names must not grow every node's memory: the oldest gone is forgotten."""
    departed = Departed(limit=3)
    departed.note(["a", "b", "c"])
    departed.note(["a"])  # gone again: the newest now
    departed.note(["d"])
    assert [n for n in "abcd" if n in departed] == ["a", "c", "d"] and len(departed) == 3
    departed.note(f"x{i}" for i in range(1000))
    assert len(departed) == 3 and "x999" in departed and "a" not in departed
