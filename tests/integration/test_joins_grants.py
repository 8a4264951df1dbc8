"""One-time join tokens and grants, against a real etcd."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import aetcd
import pytest

from hivemesh.controlplane import joins
from hivemesh.controlplane.grants import (
    GRANTS_PREFIX,
    GrantSet,
    load_grants,
    parse_grants_text,
    put_grants,
)
from hivemesh.mesh.errors import InvalidInputError, JoinTokenInvalidError

CLIENT = "spiffe://hivemesh.local/client/caller"
OPERATOR = "spiffe://hivemesh.local/operator/admin"
AGENT = "spiffe://hivemesh.local/agent/extractor"


# --- join tokens -------------------------------------------------------------------------------------------
async def test_join_token_is_one_time_and_stored_hashed(etcd: aetcd.Client) -> None:
    token = await joins.create(etcd, "extractor", "agent", 60)
    stored = list(await etcd.get_prefix(joins.JOIN_PREFIX))
    assert len(stored) == 1
    assert stored[0].key == joins.JOIN_PREFIX + hashlib.sha256(token.encode()).hexdigest().encode()
    assert token.encode() not in stored[0].value and token.encode() not in stored[0].key
    assert json.loads(stored[0].value)["name"] == "extractor"
    assert await joins.consume(etcd, token, "extractor", "agent") == ("extractor", "agent")
    with pytest.raises(JoinTokenInvalidError):
        await joins.consume(etcd, token, "extractor", "agent")
    assert not list(await etcd.get_prefix(joins.JOIN_PREFIX))


async def test_join_token_name_mismatch_is_refused_without_burning(etcd: aetcd.Client) -> None:
    token = await joins.create(etcd, "extractor", "client", 60)
    with pytest.raises(JoinTokenInvalidError) as info:
        await joins.consume(etcd, token, "someone-else", "client")
    assert info.value.message.startswith(
        "this join token was minted for client 'extractor', not client 'someone-else'"
    )
    assert await joins.consume(etcd, token, "extractor", "client") == ("extractor", "client")


@pytest.mark.parametrize(("minted", "used"), [("agent", "client"), ("client", "agent")])
async def test_join_token_of_another_kind_is_refused_without_burning(
    etcd: aetcd.Client, minted: str, used: str
) -> None:
    token = await joins.create(etcd, "worker", minted, 60)
    with pytest.raises(JoinTokenInvalidError) as info:
        await joins.consume(etcd, token, "worker", used)
    assert info.value.message.startswith(f"this join token was minted for {minted} 'worker', not {used} 'worker'")
    assert info.value.metadata == {"token_name": "worker", "token_kind": minted}
    assert await joins.consume(etcd, token, "worker", minted) == ("worker", minted)


async def test_join_token_expires(etcd: aetcd.Client) -> None:
    token = await joins.create(etcd, "short", "agent", 1)
    # Wait (bounded) for the lease to remove the key: etcd enforces its own minimum TTL.
    deadline = time.monotonic() + 15
    while await etcd.get(joins.JOIN_PREFIX + hashlib.sha256(token.encode()).hexdigest().encode()) is not None:
        assert time.monotonic() < deadline, "join token lease did not expire"
        await asyncio.sleep(0.2)
    with pytest.raises(JoinTokenInvalidError):
        await joins.consume(etcd, token, "short", "agent")


async def test_join_token_past_its_stored_expiry_is_refused_before_the_lease_fires(
    etcd: aetcd.Client,
) -> None:
    token = await joins.create(etcd, "late", "agent", 60)
    key = joins.JOIN_PREFIX + hashlib.sha256(token.encode()).hexdigest().encode()
    kv = await etcd.get(key)
    assert kv is not None
    doc = json.loads(kv.value)
    doc["expires_at"] = time.time() - 1
    await etcd.put(key, json.dumps(doc).encode(), lease=kv.lease)
    with pytest.raises(JoinTokenInvalidError):
        await joins.consume(etcd, token, "late", "agent")
    assert await etcd.get(key) is None


async def test_join_token_concurrent_use_has_one_winner(etcd: aetcd.Client) -> None:
    token = await joins.create(etcd, "racer", "agent", 60)
    results = await asyncio.gather(
        *(joins.consume(etcd, token, "racer", "agent") for _ in range(5)), return_exceptions=True
    )
    assert sum(1 for r in results if r == ("racer", "agent")) == 1
    assert all(isinstance(r, JoinTokenInvalidError) for r in results if r != ("racer", "agent"))


@pytest.mark.parametrize(
    "token", ["", "short", "x" * 43, "bad token with spaces and more than 32 chars!!", "é" * 40]
)
async def test_join_token_unknown_or_malformed(etcd: aetcd.Client, token: str) -> None:
    with pytest.raises(JoinTokenInvalidError):
        await joins.consume(etcd, token, "extractor", "agent")


@pytest.mark.parametrize(
    ("name", "kind", "ttl", "field"),
    [("Bad", "agent", 60, "name"), ("a..b", "agent", 60, "name"), ("ok", "operator", 60, "kind"),
     ("ok", "agent", 0, "ttl_seconds"), ("ok", "agent", 10**8, "ttl_seconds")],
)
async def test_join_token_create_validates(
    etcd: aetcd.Client, name: str, kind: str, ttl: int, field: str
) -> None:
    with pytest.raises(InvalidInputError) as info:
        await joins.create(etcd, name, kind, ttl)
    assert field in info.value.field_violations
    assert not list(await etcd.get_prefix(joins.JOIN_PREFIX))


# --- grants -------------------------------------------------------------------------------------------------
GRANTS_YAML = """
grants:
  - name: demo-clients
    subjects: ["spiffe://hivemesh.local/client/*", "spiffe://hivemesh.local/operator/*"]
    audiences: ["spiffe://hivemesh.local/agent/*"]
    capabilities: ["extract*"]
  - name: summarizers
    subjects: ["spiffe://hivemesh.local/client/caller"]
    capabilities: ["summarize"]
"""


def test_load_grants_yaml_and_json(tmp_path: Path) -> None:
    y = tmp_path / "grants.yaml"
    y.write_text(GRANTS_YAML)
    gs = load_grants(y)
    assert [g.name for g in gs.grants] == ["demo-clients", "summarizers"]
    j = tmp_path / "grants.json"
    j.write_text(json.dumps(gs.to_doc()))
    assert load_grants(j).to_doc() == gs.to_doc()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"grants": [{"name": "a", "subjects": ["x"], "capabilities": ["y"]},
                     {"name": "b", "subjects": ["x"], "capabilities": "y"}]},
         "grants[1].capabilities: must be a list of strings"),
        ({"grants": [{"name": "a", "subjects": ["x"], "capabilities": [1]}]},
         "grants[0].capabilities: must be a list of strings"),
        ({"grants": [{"name": "a", "subjects": [], "capabilities": ["y"]}]},
         "grants[0].subjects: must be a non-empty list of strings"),
        ({"grants": [{"name": "a", "subjects": ["x"], "audiences": "x", "capabilities": ["y"]}]},
         "grants[0].audiences: must be a non-empty list"),
        ({"grants": [{"name": "a", "subjects": ["x"]}]},
         "grants[0]: missing required field(s): capabilities"),
        ({"grants": [{"name": "a", "subjects": ["x"], "capabilities": ["y"], "capabilites": ["z"]}]},
         "grants[0]: unknown field(s): capabilites"),
        ({"grants": [{"name": "Bad Name", "subjects": ["x"], "capabilities": ["y"]}]},
         "grants[0].name: must be a string matching"),
        ({"grants": [{"name": "a", "subjects": ["x"], "capabilities": ["y"]},
                     {"name": "a", "subjects": ["x"], "capabilities": ["y"]}]},
         "grants[1].name: duplicate grant name 'a'"),
        ({"grant": []}, "missing required field(s): grants"),
        ({"grants": "all"}, "grants: must be a list of grants"),
        ([1, 2], "document"),
    ],
)
def test_grant_validation_names_the_field(doc: object, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        GrantSet.from_doc(doc)
    assert message in info.value.message, info.value.message


def test_grant_file_that_is_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        parse_grants_text("grants: [unclosed")
    with pytest.raises(InvalidInputError, match="cannot read"):
        load_grants(tmp_path / "missing.yaml")


def test_allowed_globs_and_default_deny() -> None:
    gs = parse_grants_text(GRANTS_YAML)
    offered = ["extract", "extract.v2", "summarize", "translate"]
    assert gs.allowed(CLIENT, AGENT, [], offered) == ["extract", "extract.v2", "summarize"]
    assert gs.allowed(OPERATOR, AGENT, [], offered) == ["extract", "extract.v2"]
    assert gs.allowed(CLIENT, AGENT, ["extract", "translate", "missing"], offered) == ["extract"]
    assert gs.allowed(CLIENT, AGENT, ["translate"], offered) == []
    # The audience glob limits demo-clients to agents; summarizers has no audience limit.
    assert gs.allowed(CLIENT, "spiffe://hivemesh.local/client/other", [], offered) == ["summarize"]
    # Default deny: no grant names agents as subjects.
    assert gs.allowed(AGENT, "spiffe://hivemesh.local/agent/other", [], offered) == []
    assert GrantSet().allowed(CLIENT, AGENT, ["extract"], offered) == []
    # Globs match whole ids, not prefixes or other trust domains.
    assert gs.allowed("spiffe://evil.example/client/caller", AGENT, [], offered) == []
    assert gs.allowed(CLIENT + "x", AGENT, [], offered) == ["extract", "extract.v2"]


def test_allowed_when_the_audience_is_unknown() -> None:
    gs = parse_grants_text(GRANTS_YAML)
    assert gs.allowed(CLIENT, AGENT, ["extract", "translate"], None) == ["extract"]
    # Nothing requested and nothing known offered: only literal (non-glob) grants can be named.
    assert gs.allowed(CLIENT, AGENT, [], None) == ["summarize"]
    assert gs.allowed(OPERATOR, AGENT, [], None) == []


async def test_grants_round_trip_through_etcd(etcd: aetcd.Client) -> None:
    gs = parse_grants_text(GRANTS_YAML)
    assert await put_grants(etcd, gs) == 2
    back = await GrantSet.from_etcd(etcd)
    assert sorted(g.name for g in back.grants) == ["demo-clients", "summarizers"]
    assert back.allowed(CLIENT, AGENT, [], ["extract"]) == ["extract"]
    # A corrupt document is skipped (fail closed), the others still load.
    await etcd.put(GRANTS_PREFIX + b"broken", b"{not json")
    await etcd.put(GRANTS_PREFIX + b"schema", json.dumps({"name": "schema", "subjects": "*"}).encode())
    assert len(await GrantSet.from_etcd(etcd)) == 2
    # replace=True makes the document the whole set.
    only = {"grants": [{"name": "only", "subjects": ["*"], "capabilities": ["x"]}]}
    await put_grants(etcd, only, replace=True)
    assert [g.name for g in (await GrantSet.from_etcd(etcd)).grants] == ["only"]
    assert [kv.key for kv in await etcd.get_prefix(GRANTS_PREFIX)] == [GRANTS_PREFIX + b"only"]


async def test_put_grants_validates_before_writing(etcd: aetcd.Client) -> None:
    with pytest.raises(InvalidInputError):
        await put_grants(etcd, {"grants": [{"name": "a", "subjects": ["x"], "capabilities": "y"}]})
    assert not list(await etcd.get_prefix(GRANTS_PREFIX))
