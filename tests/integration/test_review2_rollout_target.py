"""A rollout's `<name>/target` record that was written by hand (or damaged) is read as if there were none, as its
docstring says, whatever its fields hold: before, a steps entry json reads as a float infinity (1e999) raised
OverflowError out of `Target.decode` and failed that rollout on every pass, and a "created" given as the string
"false" read as True, so moving the rollout deleted an operator's routes document it had never created. Real
etcd."""

from __future__ import annotations

import json

import aetcd

from hivemesh.controlplane import policies as store
from hivemesh.controlplane.rollouts import RolloutController, Target
from hivemesh.mesh.keyspace import ROLLOUTS
from tests.integration.test_rollout_delete import rollout, rule
from tests.integration.test_rollout_delete import routes as routes_of
from tests.integration.test_rollout_moves import moved

STABLE, CANARY = {"version": "1.*"}, {"version": "2.*"}


def _target_key(name: str) -> bytes:
    return f"{ROLLOUTS}{name}/target".encode()


async def test_a_target_whose_steps_overflow_an_int_does_not_stop_the_rollout(etcd: aetcd.Client) -> None:
    await store.apply_text(etcd, rollout("work"))
    controller = RolloutController(etcd, None)
    assert (await controller.tick())["work-v2"].action == "step"
    garbage = {"routes": "rollout-work-v2", "capability": "work", "stable": STABLE, "canary": CANARY,
               "steps": [1e999], "created": True}
    await etcd.put(_target_key("work-v2"), json.dumps(garbage).encode())  # Infinity in the stored JSON
    decided = (await controller.tick())["work-v2"]
    assert decided.action != "error", decided
    kv = await etcd.get(_target_key("work-v2"))
    assert kv is not None and Target.decode(kv.value) is not None, "the unreadable target was not written again"


async def test_a_target_whose_created_flag_is_not_a_bool_deletes_no_operators_document(etcd: aetcd.Client) -> None:
    await store.apply_text(etcd, "\nkind: routes\nname: bbb-routes\nspec: {capabilities: [bbb]}\n---"
                           + rollout("bbb", "bbb-routes"))
    controller = RolloutController(etcd, None)
    assert (await controller.tick())["bbb-v2"].action == "step"
    assert (await routes_of(etcd, "bbb-routes") or {}).get("rules") == [rule(5)]
    kv = await etcd.get(_target_key("bbb-v2"))
    assert kv is not None
    written = json.loads(kv.value)
    assert written["created"] is False  # the operator's document: the rollout did not create it
    await etcd.put(_target_key("bbb-v2"), json.dumps({**written, "created": "false"}).encode())
    await store.apply_text(etcd, moved("bbb", "bbb2"))
    await controller.tick()
    assert await routes_of(etcd, "bbb-routes") is not None, "the operator's routes document was deleted"
