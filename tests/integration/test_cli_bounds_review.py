"""`hivemesh join-token`, `keys rotate`, `workflows list` and `slo list` as an operator runs them (the real CLI in
a child process) against a real control plane and etcd: a value the control plane would read as something else
is refused with the option and its range, and nothing is minted or rotated then; the control plane's own refusal
of activate_after_seconds names what it takes; `slo list --json` gives the budget its table shows.

Before: `join-token z --ttl 0` minted a 600 s token, `keys rotate --activate-after 0` a key pending 5 s, values
past int32 failed with "Value out of range: N", the server said "activate_after_seconds must be 0..3600" (0 is
its default, 5 s), `workflows list --state bogus` printed "no workflow runs" (exit 0), and `slo list --json` had no
budget. The usage errors alone, with no mesh: tests/unit/test_cli_bounds_review.py."""

from __future__ import annotations

import json
import time

import aetcd
import pytest
import yaml

from hivemesh.controlplane.joins import JOIN_PREFIX
from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.keyspace import WORKFLOW_INDEX
from hivemesh.v1 import trust_pb2
from tests.support.meshenv import MeshEnv, apply_policies_text, run_cli


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's tables and error lines unwrapped (run_cli hands the child this process's environment)."""
    monkeypatch.setenv("COLUMNS", "200")


async def _join_tokens(etcd: aetcd.Client) -> int:
    return len(list(await etcd.get_prefix(JOIN_PREFIX)))


async def _kids(env: MeshEnv) -> list[str]:
    code, out, err = await run_cli(env, "keys", "list", "--json")
    assert code == 0, err
    return [k["kid"] for k in json.loads(out)]


async def test_join_token_ttl_0_is_refused_with_the_range_and_mints_nothing(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    for ttl in ("0", "99999999999"):
        code, out, err = await run_cli(mesh_env, "join-token", "z", "--ttl", ttl, "--json")
        assert code == 2, out + err
        error = json.loads(err)["error"]
        assert error["code"] == "INVALID_ARGUMENT", err
        assert error["message"] == f"Invalid value for '--ttl': {ttl} is not in the range 1<=x<=604800.", err
    assert await _join_tokens(etcd) == 0

    for ttl in (1, 604800):  # both bounds are taken, and mean what they say
        asked = int(time.time())
        code, out, err = await run_cli(mesh_env, "join-token", f"z{ttl}", "--ttl", str(ttl), "--json")
        assert code == 0, err
        got = json.loads(out)
        assert asked + ttl <= got["expires_at_unix"] <= int(time.time()) + ttl, (asked, got)
    assert await _join_tokens(etcd) == 2


async def test_keys_rotate_0_is_refused_and_rotates_nothing_1_activates_after_1_s(mesh_env: MeshEnv) -> None:
    before = await _kids(mesh_env)
    code, out, err = await run_cli(mesh_env, "keys", "rotate", "--activate-after", "0", "--json")
    assert code == 2, out + err
    message = json.loads(err)["error"]["message"]
    assert message == ("Invalid value for '--activate-after': 0 is not in the range 1<=x<=3600: the control plane "
                       "reads 0 as its default (5 s), not as now; the shortest delay is 1."), err
    code, out, err = await run_cli(mesh_env, "keys", "rotate", "--activate-after", "999999999999")
    assert code == 2 and "'--activate-after': 999999999999 is not in the range 1<=x<=3600" in err, out + err
    assert await _kids(mesh_env) == before

    code, out, err = await run_cli(mesh_env, "keys", "rotate", "--activate-after", "1", "--json")
    assert code == 0, err
    (pending,) = [k for k in json.loads(out) if k["state"] == "pending"]
    assert pending["activates_at"] - pending["created_at"] == 1, pending


async def test_the_control_plane_names_what_activate_after_seconds_takes(mesh_env: MeshEnv) -> None:
    """0 cannot be sent (proto3: no presence), so the range it refuses with starts at 1 and says what 0 means."""
    for bad in (-1, 3601):
        with pytest.raises(InvalidInputError) as info:
            await mesh_env.operator.call(mesh_env.operator.trust.RotateSigningKey,
                                         trust_pb2.RotateSigningKeyRequest(activate_after_seconds=bad))
        msg = f"activate_after_seconds must be 1..3600 (0 or unset: the default, 5 s), got {bad}"
        assert info.value.message == msg
        assert info.value.field_violations == {"activate_after_seconds": msg}
    resp = await mesh_env.operator.call(mesh_env.operator.trust.RotateSigningKey,
                                        trust_pb2.RotateSigningKeyRequest())
    (pending,) = [k for k in resp.keys if k.state == "pending"]
    assert pending.activates_at_unix - pending.created_at_unix == 5


async def test_workflows_list_state_is_one_of_the_run_states_in_any_case(
    mesh_env: MeshEnv, etcd: aetcd.Client
) -> None:
    now = time.time()
    for local, state in (("a", "WORKING"), ("b", "INPUT_REQUIRED"), ("c", "COMPLETED")):
        wid = f"client-orders/{local}"
        await etcd.put(f"{WORKFLOW_INDEX}{wid}".encode(),
                       json.dumps({"id": wid, "state": state, "created_at": now, "owner": "client-orders"}).encode())
    code, out, err = await run_cli(mesh_env, "workflows", "list", "--state", "input_required", "--json")
    assert code == 0, err
    assert [r["id"] for r in json.loads(out)] == ["client-orders/b"]

    code, out, err = await run_cli(mesh_env, "workflows", "list", "--state", "bogus")
    assert code == 2 and out == "", out + err
    assert ("Invalid value for '--state': 'bogus' is not one of 'SUBMITTED', 'WORKING', 'INPUT_REQUIRED', "
            "'CANCELED', 'COMPLETED', 'FAILED', 'REJECTED'.") in err, err


async def test_slo_list_json_gives_the_availability_budget_the_table_shows(mesh_env: MeshEnv) -> None:
    await apply_policies_text(mesh_env.etcd, yaml.safe_dump({"kind": "slos", "name": "documents", "spec": {
        "objectives": [
            {"capability": "extract", "availability": 0.999, "window_days": 30},
            {"capability": "summarize", "latency": {"threshold_ms": 10000, "target": 0.95}, "window_days": 7},
        ]}}))
    code, out, err = await run_cli(mesh_env, "slo", "list", "--json")
    assert code == 0, err
    budgets = {o["capability"]: o["availability_budget_min"] for o in json.loads(out)}
    assert budgets == {"extract": 43.2, "summarize": None}
    code, out, err = await run_cli(mesh_env, "slo", "list")
    assert code == 0, err
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 2}
    assert "43.2 min" in rows["extract"] and "43.2 min" not in rows["summarize"], out


async def test_audit_counts_outside_1_to_10000_are_refused_and_in_range_read_that_many(mesh_env: MeshEnv) -> None:
    for name in ("a", "b", "c"):  # the control plane audits each of its own calls
        await mesh_env.operator.create_join_token(name, "agent", 60)
    code, out, err = await run_cli(mesh_env, "audit", "query", "--limit", "10000", "--json")
    assert code == 0, err
    seqs = [json.loads(line)["seq"] for line in out.splitlines()]
    assert len(seqs) >= 3, out

    for args in (["tail", "-n", "0"], ["tail", "-n", "-3"], ["query", "--limit", "0"], ["query", "--limit", "-5"]):
        code, out, err = await run_cli(mesh_env, "audit", *args, "--json")
        assert code == 2 and out == "", (args, out, err)
        assert "is not in the range 1<=x<=10000" in json.loads(err)["error"]["message"], (args, err)

    code, out, err = await run_cli(mesh_env, "audit", "query", "--limit", "2", "--json")
    assert code == 0 and [json.loads(line)["seq"] for line in out.splitlines()] == seqs[:2], out + err
    code, out, err = await run_cli(mesh_env, "audit", "tail", "-n", "2", "--json")  # the queries are audited too
    newest = [json.loads(line)["seq"] for line in out.splitlines()]
    assert code == 0 and len(newest) == 2 and seqs[-1] <= newest[0] < newest[1], out + err


async def test_an_error_without_a_reason_of_its_own_names_its_code_once(mesh_env: MeshEnv) -> None:
    """`workflows show` of no run said "(NOT_FOUND, NOT_FOUND)": the reason of an error that has none repeats the code.
    A mesh reason of its own still follows the code."""
    code, out, err = await run_cli(mesh_env, "workflows", "show", "client-nobody/nosuch")
    assert code == 1, out + err
    assert "no workflow" in err and "(NOT_FOUND)" in err and "NOT_FOUND, NOT_FOUND" not in err, err
    code, out, err = await run_cli(mesh_env, "call", "teleport", "--data", "{}", "--timeout", "1")
    assert code == 1, out + err
    assert "(NOT_FOUND, UNKNOWN_CAPABILITY)" in err, err
