"""Run ids name their owner (`hivemesh.mesh.run_ids`): the parse is exact, so a prefix grant fences one owner."""

from __future__ import annotations

import pytest

from hivemesh.mesh.etcd_roles import workload_grants
from hivemesh.mesh.run_ids import RunId, owner_prefixes, parse_run_id


def test_a_run_id_is_its_owner_then_its_local_id() -> None:
    run = parse_run_id("client-alpha.eu/wf-1")
    assert run == RunId("client", "alpha.eu", "wf-1") and run.owner == "client-alpha.eu"
    assert str(run) == "client-alpha.eu/wf-1"
    assert parse_run_id("operator-admin/x").kind == "operator"


@pytest.mark.parametrize("bad", ["wf-1", "client-alpha", "client-alpha/", "/wf-1", "robot-alpha/wf-1",
                                 "client-/wf-1", "client-Alpha/wf-1", "client-a..b/wf-1", "client-alpha/wf/1",
                                 "client-alpha/Wf-1", "clientalpha/wf-1"])
def test_anything_else_is_refused_with_the_format(bad: str) -> None:
    with pytest.raises(ValueError, match="<kind>-<name>/<local id>"):
        parse_run_id(bad)


def test_an_owners_prefixes_cover_none_of_a_name_prefix_neighbours_runs() -> None:
    prefixes = owner_prefixes("client", "alpha")
    assert prefixes == ("/hivemesh/workflows/client-alpha/", "/hivemesh/workflow-index/client-alpha/")
    neighbour = str(parse_run_id("client-alpha.eu/wf-1"))
    assert not any(f"/hivemesh/workflows/{neighbour}/".startswith(p) for p in prefixes)
    assert {g.prefix for g in workload_grants("client", "alpha")} >= set(prefixes)
    assert {g.prefix for g in workload_grants("agent", "alpha")} >= set(owner_prefixes("agent", "alpha"))
