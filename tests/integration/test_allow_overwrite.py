"""`hivemesh allow` never replaces a document it did not write, against a real control plane and etcd: a `--name`
that an operator's authz document (a DENY rule) or grant already has is refused with a message naming it and
saying what to do, nothing is written (neither document), and a dry run says the same; the same statement applied
again changes nothing; a writer that slips in between allow's check and its write is not overwritten (the write's
compare-and-swap fails); and a capability name no agent can have is refused before anything is stored. The CLI runs
as a child process (`run_cli`), the way an operator runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hivemesh.controlplane.access import access_documents
from hivemesh.controlplane.cli.policy_client import PolicyClient
from hivemesh.mesh.errors import FailedPreconditionError, NotFoundError
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, run_cli

TD = f"spiffe://{TRUST_DOMAIN}"
KEEP = f"""\
kind: authz
name: keep-me
description: an operator's own rule
spec:
  rules:
    - name: no-evil
      action: DENY
      from: {{callers: ["{TD}/client/evil"]}}
"""


async def _get(env: MeshEnv, kind: str, name: str) -> dict[str, Any] | None:
    code, out, err = await run_cli(env, "policy", "get", kind, name, "--json")
    if code == 1 and "NOT_FOUND" in err:
        return None
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def _one_line(text: str) -> str:
    return " ".join(text.split())


async def test_allow_refuses_a_name_whose_authz_document_it_did_not_write(
    mesh_env: MeshEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    keep = tmp_path / "keep.yaml"
    keep.write_text(KEEP)
    code, _out, err = await run_cli(mesh_env, "policy", "apply", "-f", str(keep))
    assert code == 0, err
    before = await _get(mesh_env, "authz", "keep-me")
    assert before is not None and before["spec"]["rules"][0]["action"] == "DENY"

    for dry in ([], ["--dry-run"]):
        code, out, err = await run_cli(mesh_env, "allow", "client/x", "extract", "--name", "keep-me", *dry)
        assert code == 1, (dry, out, err)
        said = _one_line(err)
        assert "authz/keep-me already exists and is not what this allow would write" in said, said
        assert "wrote nothing" in said and "another --name" in said, said
        assert "`hivemesh policy get authz keep-me > FILE`" in said and "`hivemesh policy apply -f FILE`" in said, said
        assert "FAILED_PRECONDITION" in said and "is updated" not in out + err, (out, err)

    as_json = await run_cli(mesh_env, "allow", "client/x", "extract", "--name", "keep-me", "--json")
    assert as_json[0] == 1 and as_json[1] == ""
    error = json.loads(as_json[2])["error"]
    assert error["code"] == "FAILED_PRECONDITION"
    assert error["details"]["field_violations"] == {"authz/keep-me": "exists, with other content"}

    after = await _get(mesh_env, "authz", "keep-me")
    assert after == before  # the DENY is still there, at the same version
    assert await _get(mesh_env, "grants", "keep-me") is None  # all or nothing: no grant either


async def test_allow_refuses_a_name_an_existing_grant_has_and_writes_neither(
    mesh_env: MeshEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    before = await _get(mesh_env, "grants", "tests-clients")  # the control plane's grants file wrote it
    assert before is not None
    code, out, err = await run_cli(mesh_env, "allow", "client/x", "extract", "--name", "tests-clients")
    assert code == 1, out + err
    assert "grants/tests-clients already exists and is not what this allow would write" in _one_line(err), err
    assert await _get(mesh_env, "grants", "tests-clients") == before
    assert await _get(mesh_env, "authz", "tests-clients") is None


async def test_the_same_statement_again_changes_nothing_and_another_on_its_name_is_refused(
    mesh_env: MeshEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    code, out, err = await run_cli(mesh_env, "allow", "client/x", "extract", "--json")
    assert code == 0, err
    first = json.loads(out)
    assert sorted((a["kind"], a["action"]) for a in first["applied"]) == [("authz", "created"), ("grants", "created")]

    for dry in (["--dry-run"], []):
        code, out, err = await run_cli(mesh_env, "allow", "client/x", "extract", "--json", *dry)
        assert code == 0, err
        again = json.loads(out)
        assert [(a["action"], a["version"]) for a in again["applied"]] == [("unchanged", first["revision"])] * 2
        assert again["revision"] == 0

    stored = await _get(mesh_env, "authz", "allow-client-x-extract")
    for other in (["client/x", "extract", "summarize", "--name", "allow-client-x-extract"],
                  ["client/x", "extract", "--description", "mine now"],
                  ["client/y", "extract", "--name", "allow-client-x-extract"]):
        code, out, err = await run_cli(mesh_env, "allow", *other)
        assert code == 1, (other, out, err)
        said = _one_line(err)
        assert "grants/allow-client-x-extract and authz/allow-client-x-extract already exist" in said, said
    assert await _get(mesh_env, "authz", "allow-client-x-extract") == stored


async def test_a_writer_between_the_check_and_the_write_is_not_overwritten(mesh_env: MeshEnv) -> None:
    """allow's write carries the versions its dry run saw: a document stored in between makes it fail."""
    from hivemesh.controlplane.access import claim_documents  # here: each other test runs on its own

    client = PolicyClient(mesh_env.operator)
    documents = access_documents(f"{TD}/client/x", ["extract"], name="raced")
    planned = await client.apply(documents, dry_run=True)
    claimed = claim_documents(documents, planned.applied)
    assert [d["version"] for d in claimed] == [0, 0]

    theirs = {"kind": "authz", "name": "raced", "description": "someone else's",
              "spec": {"rules": [{"name": "no-evil", "action": "DENY", "from": {"callers": [f"{TD}/client/evil"]}}]}}
    await client.apply([theirs])
    with pytest.raises(FailedPreconditionError) as lost:
        await client.apply(claimed)
    assert "authz/raced already exists" in lost.value.message, lost.value.message
    assert list(lost.value.field_violations) == ["documents[1].version"]  # what allow's CLI checks again on
    kept = await client.get("authz", "raced")
    assert kept.description == "someone else's" and "DENY" in kept.spec_json
    with pytest.raises(NotFoundError):
        await client.get("grants", "raced")  # the grant was not written alone

    # Checked again, what the other writer stored is refused by name, not overwritten.
    with pytest.raises(FailedPreconditionError) as refused:
        claim_documents(documents, (await client.apply(documents, dry_run=True)).applied)
    assert refused.value.field_violations == {"authz/raced": "exists, with other content"}


async def test_a_capability_no_agent_can_have_is_refused_and_nothing_is_stored(
    mesh_env: MeshEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    for bad in ("BAD CAP", "Extract", "a/b", "x" * 64, "search-*!", "[]"):
        code, out, err = await run_cli(mesh_env, "allow", "client/orders", "extract", bad)
        assert code == 2, (bad, out, err)
        assert f"capability {bad!r} is not a capability name" in _one_line(err), (bad, err)
    code, out, err = await run_cli(mesh_env, "allow", "client/orders", "BAD CAP", "--json")
    assert code == 2 and out == "" and json.loads(err)["error"]["code"] == "INVALID_ARGUMENT", err
    code, out, err = await run_cli(mesh_env, "policy", "list", "--json")
    assert code == 0, err
    assert not [d for d in json.loads(out) if d["name"].startswith("allow-")], out

    # Globs that can match capability names are statements allow makes.
    code, out, err = await run_cli(mesh_env, "allow", "client/orders", "search-*", "ocr-v[12]", "*", "--dry-run")
    assert code == 0, err
