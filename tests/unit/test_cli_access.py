"""One way to say "this caller may call this capability" (`hivemesh allow`) and `authz check` explaining both
gates, without a mesh: identities given without `spiffe://` are completed or refused with a message (never a
silent deny), the two documents validate and compile, and the explanation names the grant and the rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemesh.controlplane.access import access_documents, access_name, explain_access, spiffe_id
from hivemesh.controlplane.policies import validate_documents
from tests.support.cli_offline import hivemesh

TD = "example.test"
ALICE = f"spiffe://{TD}/client/alice"
ECHO = f"spiffe://{TD}/agent/echo"


def test_identities_without_the_scheme_are_completed_or_refused_with_a_message() -> None:
    assert spiffe_id("client/alice", TD) == spiffe_id(f"{TD}/client/alice", TD) == spiffe_id(ALICE, TD) == ALICE
    assert spiffe_id("client/*", TD, globs=True) == f"spiffe://{TD}/client/*"
    for bad, words in [
        ("alice", f"caller 'alice' is not a SPIFFE id: give spiffe://{TD}/KIND/NAME or KIND/NAME (KIND one of "
                  "agent, client, operator)"),
        ("robot/alice", "is not a SPIFFE id"),
        ("https://example.test/client/alice", "it must start with 'spiffe://'"),
        ("client/*", "is a pattern: give one identity"),
        ("client/Alice", "bad SPIFFE id"),
        ("", "caller is empty"),
    ]:
        with pytest.raises(ValueError) as info:
            spiffe_id(bad, TD)
        assert words in str(info.value), (bad, str(info.value))


def test_one_statement_makes_both_gates_pass_and_the_explanation_names_each() -> None:
    from hivemesh.controlplane.grants import Grant, GrantSet
    from hivemesh.mesh.authz import compile_authz

    def explain(grants: GrantSet, docs: dict[str, object]) -> dict[str, object]:
        return explain_access(grants, compile_authz(docs), caller=ALICE, capability="echo", action="invoke",
                              agent=ECHO, principal=ALICE)

    before = explain(GrantSet(), {})
    assert before["allowed"] is False
    assert before["grant"] == {"granted": False, "grants": [], "reason": (
        f"no grant lets {ALICE} get a token for echo on {ECHO}: the control plane refuses the token before any "
        "node sees the call")}
    assert before["authz"]["allowed"] is False and "default deny" in before["authz"]["reason"]

    name = access_name(ALICE, ["echo"])
    assert name == "allow-client-alice-echo" and access_name(ALICE, ["echo"]) == name  # stable: re-apply is a no-op
    long = access_name(f"spiffe://{TD}/client/" + "x" * 60, ["search-*", "summarize"])
    assert len(long) == 63 and long.startswith("allow-client-xxx")
    docs = access_documents(ALICE, ["echo"], name=name)
    grants_doc, authz_doc = validate_documents(docs)  # both kinds, valid as the control plane checks them
    assert (grants_doc.doc.kind, authz_doc.doc.kind) == ("grants", "authz")
    grants = GrantSet([Grant.from_doc({"name": name, **grants_doc.doc.spec})])
    after = explain(grants, {name: authz_doc.doc})
    assert after["allowed"] is True
    assert after["grant"]["grants"] == [name]
    assert after["authz"]["rule"] == f"{name}/allow"
    # Narrowed to one agent: another agent passes neither gate.
    narrow = access_documents(ALICE, ["echo"], name=name, agents=[ECHO])
    g2, a2 = validate_documents(narrow)
    other = explain_access(GrantSet([Grant.from_doc({"name": name, **g2.doc.spec})]), compile_authz({name: a2.doc}),
                           caller=ALICE, capability="echo", action="invoke", agent=f"spiffe://{TD}/agent/other",
                           principal=ALICE)
    assert other["grant"]["granted"] is False and other["authz"]["allowed"] is False


def test_the_cli_refuses_a_caller_it_cannot_read_before_any_network(home: Path) -> None:
    assert hivemesh(home, "certs", "init", "--trust-domain", TD).exit_code == 0
    for args in (["authz", "check", "--caller", "alice", "--capability", "echo"], ["allow", "alice", "echo"]):
        result = hivemesh(home, *args)
        assert result.exit_code == 2, result.output
        assert f"error: caller 'alice' is not a SPIFFE id: give spiffe://{TD}/KIND/NAME" in result.stderr
    bad_name = hivemesh(home, "allow", "client/alice", "echo", "--name", "Alice's", "--json")
    assert bad_name.exit_code == 1, bad_name.output
    assert '"documents[0].name": "must be a string matching [a-z0-9][a-z0-9._-]{0,62}"' in bad_name.stderr
    # A caller it can read gets as far as finding the mesh (none runs here).
    located = hivemesh(home, "authz", "check", "--caller", "client/alice", "--capability", "echo")
    assert "mesh location unknown" in located.stderr and "not a SPIFFE id" not in located.stderr
