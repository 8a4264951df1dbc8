"""Authorization policies (`kind: authz`): the decision table, validation, and enforcement over the real mesh
(default deny with no policy, DENY before ALLOW, dry-run audited, `hivemesh authz check`)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from hivemesh.controlplane.policies import apply_text
from hivemesh.mesh.authz import (
    AUTHZ,
    AuthzRequest,
    compile_authz,
    register_custom_provider,
    unregister_custom_provider,
)
from hivemesh.mesh.errors import InvalidInputError, PolicyDeniedError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.policy import PolicyDoc, PolicyError
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.v1 import audit_pb2
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, apply_policies_text, run_cli, start_mesh_env, stop_mesh_env

TD = f"spiffe://{TRUST_DOMAIN}"
ECHO = f"{TD}/agent/echo"
ALICE = f"{TD}/client/alice"
BOB = f"{TD}/client/bob"


def table(*docs: dict[str, Any]) -> Any:
    kind = AUTHZ
    compiled = {}
    for d in docs:
        doc = PolicyDoc("authz", d["name"], d["spec"])
        kind.validate(doc)
        compiled[d["name"]] = doc
    return compile_authz(compiled)


def req(caller: str = ALICE, capability: str | None = "echo", action: str = "invoke", *,
        principal: str | None = None, agent: str = ECHO) -> AuthzRequest:
    return AuthzRequest(caller=caller, capability=capability, action=action, agent=agent,
                        principal=principal if principal is not None else (caller if capability else None))


def allow(name: str = "allow", **frm_to: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": name, "action": "ALLOW"}
    rule.update(frm_to)
    return rule


# --- T3: the decision table ------------------------------------------------------------------------------------
def test_t3_decision_table() -> None:
    rows: list[tuple[str, bool, str]] = []

    def check(label: str, t: Any, r: AuthzRequest, allowed: bool, rule: str = "") -> None:
        d = t.decide(r)
        assert d.allowed is allowed, (label, d)
        if rule:
            assert d.rule == rule, (label, d)
        rows.append((label, d.allowed, d.rule or "default"))

    # 1. No policy at all: deny (stricter than Istio).
    check("no policy", table(), req(), False)
    allow_alice = {"name": "p", "spec": {"rules": [allow("alice", **{"from": {"callers": [ALICE]}})]}}
    # 2-3. ALLOW match / miss.
    check("allow match", table(allow_alice), req(), True, "p/alice")
    check("allow miss", table(allow_alice), req(BOB), False)
    # 4. DENY beats ALLOW, whatever the order of the documents.
    deny_echo = {"name": "a-deny", "spec": {"rules": [{"name": "no-echo", "action": "DENY",
                                                       "to": {"capabilities": ["ech*"]}}]}}
    check("deny beats allow", table(allow_alice, deny_echo), req(), False, "a-deny/no-echo")
    # 5-7. CUSTOM: a provider denying beats ALLOW; allowing defers to ALLOW; an unknown provider fails closed.
    custom = {"name": "c", "spec": {"rules": [{"name": "ask", "action": "CUSTOM", "provider": "pdp"}]}}
    register_custom_provider("pdp", lambda r: "bob is blocked" if r.caller == BOB else None)
    try:
        allow_all = {"name": "p", "spec": {"rules": [allow("all", **{"from": {"callers": [f"{TD}/*"]}})]}}
        check("custom deny beats allow", table(allow_all, custom), req(BOB), False, "c/ask")
        check("custom allow then allow", table(allow_all, custom), req(ALICE), True, "p/all")
    finally:
        unregister_custom_provider("pdp")
    check("custom provider missing", table(allow_all, custom), req(ALICE), False, "c/ask")
    # 8-9. A missing attribute (Describe has no principal nor capability): DENY matches, ALLOW does not.
    deny_principal = {"name": "d", "spec": {"rules": [{"name": "not-mallory", "action": "DENY",
                                                       "from": {"principals": [f"{TD}/client/mallory"]}}]}}
    describe = req(ALICE, None, "describe")
    check("deny with missing attribute matches", table(allow_all, deny_principal), describe, False, "d/not-mallory")
    allow_principal = {"name": "p", "spec": {"rules": [allow("users", **{"from": {"principals": [f"{TD}/*"]}})]}}
    check("allow with missing attribute fails", table(allow_principal), describe, False)
    # 10. Dry run: audited as "would deny", not enforced.
    dry = {"name": "trial", "spec": {"mode": "dry-run", "rules": [{"name": "no-bob", "action": "DENY",
                                                                    "from": {"callers": [BOB]}}]}}
    d = table(allow_all, dry).decide(req(BOB))
    assert d.allowed and d.would_deny == "trial/no-bob"
    rows.append(("dry run logs, does not enforce", d.allowed, d.rule))
    assert table(allow_all, dry).decide(req(ALICE)).would_deny == ""
    # 11. Teams are operator-defined; not_teams denies the rest.
    teams = {"name": "t", "spec": {"teams": {"finance": [f"{TD}/agent/ledger*"]}, "rules": [
        allow("finance", **{"from": {"teams": ["finance"]}}),
        {"name": "outsiders", "action": "DENY", "from": {"not_teams": ["finance"]}, "to": {"capabilities": ["pay"]}},
    ]}}
    check("team allow", table(teams), req(f"{TD}/agent/ledger-1", "pay"), True, "t/finance")
    check("not_teams deny", table(teams), req(f"{TD}/agent/other", "pay"), False, "t/outsiders")
    # 12. The original principal of a delegated call can be matched apart from the caller.
    via = {"name": "v", "spec": {"rules": [allow("for-alice", **{"from": {"principals": [ALICE]}})]}}
    check("principal through delegation", table(via), req(f"{TD}/agent/relay", principal=ALICE), True)
    check("principal mismatch", table(via), req(f"{TD}/agent/relay", principal=BOB), False)
    # Actions and agents narrow a rule too.
    stream_only = {"name": "s", "spec": {"rules": [allow("s", to={"actions": ["stream"], "agents": [ECHO]})]}}
    check("action mismatch", table(stream_only), req(), False)
    check("action match", table(stream_only), req(action="stream"), True)
    check("other agent", table(stream_only), req(action="stream", agent=f"{TD}/agent/x"), False)
    assert len(rows) >= 12
    print("\nFIGURE authz decision table: " + "; ".join(f"{a}={'ALLOW' if b else 'DENY'}" for a, b, _ in rows))


def test_explain_names_the_failing_condition() -> None:
    t = table({"name": "p", "spec": {"rules": [allow("alice", **{"from": {"callers": [ALICE]}})]}})
    (row,) = t.explain(req(BOB))
    assert row == {"rule": "p/alice", "action": "ALLOW", "mode": "enforce", "matched": "no", "failed": "from.callers"}


@pytest.mark.parametrize(
    ("spec", "path"),
    [
        ({"rules": [{"name": "x", "action": "MAYBE"}]}, "spec.rules[0].action"),
        ({"rules": [{"name": "x", "action": "ALLOW", "from": {"callerz": ["a"]}}]}, "spec.rules[0].from.callerz"),
        ({"rules": [{"name": "x", "action": "CUSTOM"}]}, "spec.rules[0].provider"),
        ({"rules": [{"name": "x", "action": "ALLOW"}, {"name": "x", "action": "DENY"}]}, "spec.rules[1].name"),
        ({"rules": [{"name": "x", "action": "ALLOW", "to": {"actions": ["delete"]}}]}, "spec.rules[0].to.actions[0]"),
        ({"mode": "sometimes", "rules": []}, "spec.mode"),
    ],
)
def test_bad_documents_name_the_field(spec: dict[str, Any], path: str) -> None:
    with pytest.raises(PolicyError) as info:
        AUTHZ.validate(PolicyDoc("authz", "bad", spec))
    assert info.value.path == path, info.value


def test_a_team_defined_nowhere_refuses_the_set() -> None:
    with pytest.raises(PolicyError, match="defined in no authz policy"):
        table({"name": "p", "spec": {"rules": [allow("t", **{"from": {"teams": ["ghosts"]}})]}})


# --- over the real mesh ------------------------------------------------------------------------------------------
async def _audit(env: Any, **kw: Any) -> list[dict[str, Any]]:
    resp = await env.operator.call(env.operator.audit.Query, audit_pb2.AuditQueryRequest(limit=1000, **kw))
    return [json.loads(e)["record"] for e in resp.entries]


@pytest.mark.slow
async def test_default_deny_then_policies_take_effect_live(etcd: Any, etcd_server: EtcdServer, tmp_path: Path) -> None:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, authz=None)  # no authz policy at all
    try:
        async with AgentServer(EchoAgent(), await env.settings_for("echo"),
                               AgentServerConfig(audit_dir=tmp_path / "a")) as server:
            async with MeshClient.connect(name="alice", settings=await env.settings_for("alice", "client")) as mesh:
                assert await mesh.node.registry.wait_for_capability("echo", 1, timeout=10)
                with pytest.raises(PolicyDeniedError) as denied:
                    await mesh.call("echo", {"text": "hi"}, timeout=5)
                assert "default deny" in denied.value.message
                # An ALLOW policy applied while the agent runs takes effect within a second.
                started = time.monotonic()
                await apply_policies_text(env.etcd, yaml.safe_dump({"kind": "authz", "name": "users", "spec": {
                    "rules": [{"name": "clients-echo", "action": "ALLOW", "from": {"callers": [f"{TD}/client/*"]},
                               "to": {"capabilities": ["echo"]}}]}}))
                while True:
                    try:
                        await mesh.call("echo", {"text": "hi"}, timeout=5)
                        break
                    except PolicyDeniedError:
                        assert time.monotonic() - started < 1.0, "the policy took more than a second"
                        await asyncio.sleep(0.01)
                took = time.monotonic() - started
                # A DENY beats it; a dry-run DENY is only audited.
                await apply_policies_text(env.etcd, yaml.safe_dump({"kind": "authz", "name": "trial", "spec": {
                    "mode": "dry-run", "rules": [{"name": "no-alice", "action": "DENY",
                                                  "from": {"callers": [ALICE]}}]}}))
                await asyncio.sleep(0.3)
                await mesh.call("echo", {"text": "still allowed"}, timeout=5)
                await apply_policies_text(env.etcd, yaml.safe_dump({"kind": "authz", "name": "lockdown", "spec": {
                    "rules": [{"name": "no-echo", "action": "DENY", "to": {"capabilities": ["echo"]}}]}}))
                deadline = time.monotonic() + 2
                while True:
                    try:
                        await mesh.call("echo", {"text": "x"}, timeout=5)
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.01)
                    except PolicyDeniedError as exc:
                        assert exc.metadata["rule"] == "lockdown/no-echo"
                        break
            assert server.audit is not None and server.audit.shipper is not None
            assert await server.audit.shipper.wait_shipped(timeout=10)
        recs = await _audit(env, agent=ECHO)
        assert recs[0]["decision"] == "deny" and recs[0]["reason"] == "POLICY_DENIED" and "rule" not in recs[0]
        assert any(r.get("dry_run") == "deny:trial/no-alice" and r["decision"] == "allow" for r in recs)
        assert recs[-1]["rule"] == "lockdown/no-echo" and recs[-1]["decision"] == "deny"
        print(f"\nFIGURE authz: a new ALLOW policy in force {took * 1000:.0f} ms after it was applied")

        # `hivemesh authz check` explains a decision from the policies in etcd.
        args = ["authz", "check", "--caller", ALICE, "--capability", "echo", "--agent", ECHO]
        code, out, err = await run_cli(env, *args)
        assert code == 1 and "DENY" in out and "lockdown/no-echo" in out, out + err
        code, out, err = await run_cli(env, *args[:-4], "--capability", "shout", "--agent", f"{TD}/agent/other",
                                       "--json")
        assert code == 1, err
        (result,) = json.loads(out)
        assert result["allowed"] is False and {r["rule"] for r in result["rules"]} >= {"users/clients-echo"}
    finally:
        await stop_mesh_env(env)


async def test_apply_refuses_a_bad_authz_document_whole(etcd: Any) -> None:
    text = yaml.safe_dump_all([
        {"kind": "authz", "name": "good", "spec": {"rules": [{"name": "a", "action": "ALLOW"}]}},
        {"kind": "authz", "name": "bad", "spec": {"rules": [{"name": "a", "action": "PERMIT"}]}},
    ])
    with pytest.raises(InvalidInputError) as info:
        await apply_text(etcd, text)
    assert "spec.rules[0].action" in info.value.message
    assert not [kv async for kv in _prefix(etcd, b"/hivemesh/policies/authz/")]


async def _prefix(etcd: Any, prefix: bytes) -> Any:
    for kv in await etcd.get_prefix(prefix):
        yield kv
