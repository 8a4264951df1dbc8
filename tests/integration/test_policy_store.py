"""The policy framework against a real etcd: validation that names the field, all-or-nothing applies in one
transaction, dry runs, versions (mod revisions) and compare-and-swap, the grants kind kept in its old form,
and the node-side PolicyCache that compiles every kind and swaps the compiled view on each watch event."""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType

import aetcd
import pytest

from hivemesh.controlplane import policies as store
from hivemesh.controlplane.grants import GRANTS_PREFIX, GrantSet
from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError, NotFoundError
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.policy import (
    PolicyCache,
    PolicyDoc,
    PolicyError,
    PolicyKind,
    PolicyKinds,
    policy_key,
)
from hivemesh.mesh.resilience.kinds import RETRIES, ROUTES, TRAFFIC_KINDS


def _apply(text: str) -> list[store.PolicyInput]:
    return store.validate_documents(store.parse_documents(text))


RETRY_DOC = """
kind: retries
name: default
description: retry unavailable twice
spec:
  attempts: 3
  retryable_codes: [UNAVAILABLE]
"""


# --- validation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("kind: retries\nname: d\nspec: {attempts: 11}", "spec.attempts", "must be <= 10"),
        ("kind: retries\nname: d\nspec: {attempts: 2, backof: {}}", "spec.backof", "unknown field"),
        ("kind: retries\nname: d\nspec: {}", "spec.attempts", "is required"),
        ("kind: retries\nname: d\nspec: {attempts: 2, retryable_codes: [UNAVAILABLE, PERMISSION_DENIED]}",
         "spec.retryable_codes[1]", "never retried"),
        ("kind: retries\nname: d\nspec: {attempts: 'three'}", "spec.attempts", "must be an integer"),
        ("kind: routes\nname: d\nspec: {rules: [{split: [{weight: 1}]}]}", "spec.rules[0].split[0]",
         "needs a version or labels"),
        ("kind: routes\nname: d\nspec: {load_balancer: random}", "spec.load_balancer", "must be one of"),
        ("kind: breakers\nname: d\nspec: {instance: {open_ms: 10}}", "spec.instance", "consecutive_failures"),
        ("kind: ratelimits\nname: d\nspec: {total_rps: -1}", "spec.total_rps", "must be >= 0"),
        ("kind: concurrency\nname: d\nspec: {max_in_flight: 2, classes: [{name: hi, min_priority: 1, reserved: 2}]}",
         "spec.classes", "less than max_in_flight"),
        ("kind: nope\nname: d\nspec: {}", "kind", "unknown policy kind"),
        ("kind: retries\nname: Bad_Name\nspec: {attempts: 1}", "name", "must be a string matching"),
        ("kind: retries\nname: d\nspec: {attempts: 1}\ncolour: red", "colour", "unknown field"),
        ("kind: retries\nname: d\nversion: -1\nspec: {attempts: 1}", "version", "integer >= 0"),
        ("kind: retries\nname: d", "spec", "is required"),
        ("- just a list item", "", "must be a mapping"),
    ],
)
def test_bad_documents_are_refused_naming_the_field(text: str, field: str, words: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        _apply(text)
    err = info.value
    assert field in err.field_violations, err.field_violations
    assert words in err.field_violations[field]
    assert words in err.message


def test_errors_in_a_multi_document_file_point_at_the_document() -> None:
    text = RETRY_DOC + "---\nkind: timeouts\nname: t\nspec: {default_ms: 0}\n"
    with pytest.raises(InvalidInputError) as info:
        _apply(text)
    assert info.value.field_violations == {"documents[1].spec.default_ms": "must be >= 1"}
    assert "documents[1] (timeouts/t)" in info.value.message
    with pytest.raises(InvalidInputError, match=r"also documents\[0\]"):
        _apply(RETRY_DOC + "---\n" + RETRY_DOC)
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        store.parse_documents("kind: [unclosed")
    assert len(store.parse_documents(json.dumps([{"a": 1}, {"b": 2}]))) == 2


def test_the_kinds_a_consumer_lists() -> None:
    assert {"routes", "retries", "timeouts", "breakers", "ratelimits", "concurrency", "authz", "budgets",
            "grants", "slos", "state", "rollouts", "escalations", "providers"} == set(store.KINDS)
    with pytest.raises(PolicyError, match="unknown policy kind 'nope'"):
        store.KINDS.get_kind("nope")
    with pytest.raises(ValueError, match="two different policy kinds"):
        PolicyKinds([RETRIES, PolicyKind(name="retries", spec_schema={}, compile=lambda docs: None)])
    with pytest.raises(ValueError, match="must match"):
        PolicyKind(name="Bad Kind", spec_schema={}, compile=lambda docs: None)

    # A kind declared by another component (as issue 4 does with `authz`) is validated and compiled the same way
    # once the store is given it, and only then.
    def compile_demo(docs: Mapping[str, PolicyDoc]) -> frozenset[str]:
        return frozenset(d.spec["word"] for d in docs.values())

    demo = PolicyKind(name="demo-words", spec_schema={
        "type": "object", "required": ["word"], "additionalProperties": False,
        "properties": {"word": {"type": "string", "maxLength": 5}}}, compile=compile_demo)
    known = store.KINDS.including(demo)
    assert known.get_kind("demo-words") is demo and "demo-words" not in store.KINDS
    assert known.including(demo) == known  # the same kind listed twice is one kind
    raws = store.parse_documents("kind: demo-words\nname: w\nspec: {word: toolong}")
    with pytest.raises(InvalidInputError) as info:
        store.validate_documents(raws, kinds=known)
    assert info.value.field_violations == {"spec.word": "must be at most 5 characters long"}
    with pytest.raises(InvalidInputError, match="unknown policy kind 'demo-words'"):
        _apply("kind: demo-words\nname: w\nspec: {word: hi}")
    [ok] = store.validate_documents(store.parse_documents("kind: demo-words\nname: w\nspec: {word: hi}"),
                                    kinds=known)
    assert ok.kind is demo
    assert demo.compile({"w": PolicyDoc("demo-words", "w", {"word": "hi"})}) == frozenset({"hi"})


# --- the store ---------------------------------------------------------------------------------------------------
async def test_apply_stores_with_versions_and_is_idempotent(etcd: aetcd.Client) -> None:
    result = await store.apply_policies(etcd, _apply(RETRY_DOC))
    [applied] = result.applied
    assert (applied.kind, applied.name, applied.action) == ("retries", "default", "created")
    kv = await etcd.get(policy_key("retries", "default").encode())
    assert kv is not None and applied.version == kv.mod_revision == result.revision
    assert json.loads(kv.value) == {"kind": "retries", "name": "default", "description": "retry unavailable twice",
                                    "spec": {"attempts": 3, "retryable_codes": ["UNAVAILABLE"]}}
    again = await store.apply_policies(etcd, _apply(RETRY_DOC))
    assert again.applied[0].action == "unchanged" and again.applied[0].version == applied.version
    assert again.revision == 0
    doc = await store.get_policy(etcd, "retries", "default")
    assert doc.version == applied.version and doc.spec["attempts"] == 3
    changed = await store.apply_policies(etcd, _apply(RETRY_DOC.replace("attempts: 3", "attempts: 4")))
    assert changed.applied[0].action == "updated" and changed.applied[0].version > applied.version


async def test_a_bad_document_in_a_batch_changes_nothing(etcd: aetcd.Client) -> None:
    await store.apply_policies(etcd, _apply(RETRY_DOC))
    before = {kv.key: kv.mod_revision for kv in await etcd.get_prefix(b"/hivemesh/policies/")}
    # Each document is valid alone; together with the stored one the second makes retries ambiguous.
    batch = RETRY_DOC.replace("attempts: 3", "attempts: 5") + """---
kind: timeouts
name: t
spec: {default_ms: 500}
---
kind: retries
name: also-everything
spec: {attempts: 2}
"""
    with pytest.raises(InvalidInputError, match="ambiguous"):
        await store.apply_policies(etcd, _apply(batch))
    after = {kv.key: kv.mod_revision for kv in await etcd.get_prefix(b"/hivemesh/policies/")}
    assert after == before
    ok = await store.apply_policies(etcd, _apply(batch.replace("spec: {attempts: 2}",
                                                               "spec: {attempts: 2, capabilities: [x]}")))
    assert [a.action for a in ok.applied] == ["updated", "created", "created"]
    assert len({a.version for a in ok.applied}) == 1  # one transaction, one revision


async def test_documents_past_what_one_transaction_can_write_are_invalid_input(etcd: aetcd.Client) -> None:
    """One apply is one etcd transaction, and etcd refuses a request past 1.5 MiB: a grant of 50,000 subjects was
    refused by etcd and reported as the registry being unavailable (a status clients retry). Now it is invalid
    input naming the largest document, and nothing is written."""
    subjects = [f"spiffe://hivemesh.local/client/c-{i:05d}" for i in range(50_000)]

    def grant(name: str, count: int) -> list[store.PolicyInput]:  # as ApplyPolicies reads an RPC's documents
        return store.validate_documents([{"kind": "grants", "name": name,
                                          "spec": {"subjects": subjects[:count], "capabilities": ["read"]}}])

    with pytest.raises(InvalidInputError, match="grants/everyone") as refused:
        await store.apply_policies(etcd, grant("everyone", 50_000))
    assert refused.value.metadata["max_apply_bytes"] == str(store.MAX_APPLY_BYTES)
    assert await etcd.get(GRANTS_PREFIX + b"everyone") is None
    await store.apply_policies(etcd, grant("many", 5_000))  # a large grant that fits is stored
    assert await etcd.get(GRANTS_PREFIX + b"many") is not None


async def test_dry_run_validates_and_writes_nothing(etcd: aetcd.Client) -> None:
    result = await store.apply_policies(etcd, _apply(RETRY_DOC), dry_run=True)
    assert result.dry_run and result.applied[0].action == "created" and result.revision == 0
    assert await etcd.get(policy_key("retries", "default").encode()) is None
    with pytest.raises(InvalidInputError):
        await store.apply_text(etcd, "kind: retries\nname: x\nspec: {attempts: 0}", dry_run=True)


async def test_versions_compare_and_swap_and_delete(etcd: aetcd.Client) -> None:
    created = (await store.apply_policies(etcd, _apply(RETRY_DOC + "version: 0\n"))).applied[0].version
    with pytest.raises(FailedPreconditionError, match="already exists"):
        await store.apply_policies(etcd, _apply(RETRY_DOC + "version: 0\n"))
    with pytest.raises(FailedPreconditionError, match=f"at version {created}"):
        await store.apply_policies(etcd, _apply(RETRY_DOC.replace("3", "4") + f"version: {created + 100}\n"))
    updated = await store.apply_policies(etcd, _apply(RETRY_DOC.replace("3", "4") + f"version: {created}\n"))
    assert updated.applied[0].action == "updated"
    with pytest.raises(FailedPreconditionError):
        await store.delete_policy(etcd, "retries", "default", expected_version=created)
    assert await store.delete_policy(etcd, "retries", "default") > created
    with pytest.raises(NotFoundError):
        await store.delete_policy(etcd, "retries", "default")
    with pytest.raises(NotFoundError):
        await store.get_policy(etcd, "retries", "default")
    with pytest.raises(InvalidInputError, match="unknown policy kind"):
        await store.list_policies(etcd, "nope")
    # A name or kind no document can have is refused with a short message: a 20,000-character name was echoed
    # whole into the status, past gRPC's 16 KiB metadata bound (RESOURCE_EXHAUSTED at the client).
    for get_or_delete in (store.get_policy, store.delete_policy):
        with pytest.raises(InvalidInputError) as long_name:
            await get_or_delete(etcd, "retries", "n" * 20_000)
        assert len(long_name.value.message) < 200 and long_name.value.field_violations.keys() == {"name"}
        with pytest.raises(InvalidInputError) as long_kind:
            await get_or_delete(etcd, "k" * 20_000, "default")
        assert len(long_kind.value.message) < 400, len(long_kind.value.message)


async def test_grants_coexist_in_their_flat_form(etcd: aetcd.Client) -> None:
    text = """
kind: grants
name: readers
description: clients may read
spec:
  subjects: ["spiffe://hivemesh.local/client/*"]
  capabilities: [read]
---
kind: retries
name: default
spec: {attempts: 2}
"""
    await store.apply_policies(etcd, _apply(text))
    kv = await etcd.get(GRANTS_PREFIX + b"readers")
    assert kv is not None and json.loads(kv.value)["name"] == "readers"  # the grant store's own format
    grants = await GrantSet.from_etcd(etcd)
    assert grants.allowed("spiffe://hivemesh.local/client/x", "spiffe://hivemesh.local/agent/a", ["read"], None) == [
        "read"]
    listed = await store.list_policies(etcd)
    assert [(d.kind, d.name) for d in listed] == [("grants", "readers"), ("retries", "default")]
    with pytest.raises(InvalidInputError) as info:
        _apply("kind: grants\nname: g\nspec: {subjects: []}")
    assert "spec.subjects" in info.value.field_violations or "spec.capabilities" in info.value.field_violations


# --- the node-side cache -------------------------------------------------------------------------------------------
async def test_policy_cache_compiles_and_swaps_on_every_change(etcd: aetcd.Client, etcd_server: EtcdServer) -> None:
    async with PolicyCache(etcd_server.access, kinds=TRAFFIC_KINDS) as cache:
        empty = cache.get(RETRIES)
        assert empty.lookup("x") is None and cache.get(ROUTES).lookup("x") is None
        result = await store.apply_policies(etcd, _apply(RETRY_DOC))
        assert await cache.wait_for_revision(result.revision, 5)
        view = cache.get(RETRIES)
        assert view is not empty and view.lookup("anything").attempts == 3
        assert cache.docs("retries")[0].name == "default"
        routes_before = cache.get(ROUTES)
        # A change to one kind recompiles only that kind.
        r2 = await store.apply_policies(etcd, _apply("kind: timeouts\nname: t\nspec: {default_ms: 100}"))
        assert await cache.wait_for_revision(r2.revision, 5)
        assert cache.get(ROUTES) is routes_before and cache.compiled("timeouts").lookup("x") == 0.1
        # An invalid document written behind the control plane's back is left out, not fatal.
        await etcd.put(policy_key("retries", "junk").encode(), b'{"spec": {"attempts": 99}}')
        await etcd.put(b"/hivemesh/policies/someone-elses-kind/x", b"whatever")
        r3 = await store.apply_policies(etcd, _apply("kind: timeouts\nname: t\nspec: {default_ms: 200}"))
        assert await cache.wait_for_revision(r3.revision, 5)
        assert cache.compiled("timeouts").lookup("x") == 0.2
        assert cache.get(RETRIES).lookup("x").attempts == 3
        assert any("junk" in k for k in cache.problems)
        # A set that does not compile (two documents claiming the same target) keeps the last good value.
        await etcd.put(policy_key("retries", "dupe").encode(),
                       json.dumps({"kind": "retries", "name": "dupe", "spec": {"attempts": 5}}).encode())
        r4 = await store.delete_policy(etcd, "timeouts", "t")
        assert await cache.wait_for_revision(r4, 5)
        assert cache.get(RETRIES).lookup("x").attempts == 3 and "retries" in cache.problems
        assert cache.compiled("timeouts").lookup("x") is None
        await etcd.delete(policy_key("retries", "dupe").encode())
        await store.delete_policy(etcd, "retries", "default")
        assert await cache.watch.wait_for(lambda _s: cache.get(RETRIES).lookup("x") is None, 5)
        assert "retries" not in cache.problems
        assert isinstance(cache.view(), MappingProxyType)


async def test_outbound_policy_lookup_follows_every_policy_change(etcd: aetcd.Client, etcd_server: EtcdServer) -> None:
    """PolicyView.outbound caches a capability's outbound policies per compiled view: a change applies at once."""
    from hivemesh.mesh.resilience.kinds import TIMEOUTS
    from hivemesh.mesh.resilience.view import NO_OUTBOUND_POLICIES, PolicyView

    async with PolicyCache(etcd_server.access, kinds=TRAFFIC_KINDS) as cache:
        traffic = PolicyView(cache)
        assert not cache.get(TIMEOUTS) and len(cache.get(TIMEOUTS)) == 0  # __bool__ agrees with len on empty
        assert traffic.outbound("work") == NO_OUTBOUND_POLICIES
        assert traffic.outbound("work") is traffic.outbound("work")  # looked up once per view
        r1 = await store.apply_policies(etcd, _apply("kind: timeouts\nname: t\nspec: {default_ms: 100}"))
        assert await cache.wait_for_revision(r1.revision, 5)
        assert cache.get(TIMEOUTS) and len(cache.get(TIMEOUTS)) == 1
        assert traffic.outbound("work").timeout == 0.1 and traffic.outbound("work").retries is None
        r2 = await store.apply_policies(etcd, _apply(RETRY_DOC))
        assert await cache.wait_for_revision(r2.revision, 5)
        after = traffic.outbound("work")
        assert after.timeout == 0.1 and after.retries is not None and after.retries.attempts == 3
        assert (after.timeout, after.routes, after.breakers, after.retries) == (
            traffic.timeout("work"), traffic.routes("work"), traffic.breakers("work"), traffic.retries("work"))
        r3 = await store.delete_policy(etcd, "timeouts", "t")
        assert await cache.wait_for_revision(r3, 5)
        assert traffic.outbound("work").timeout is None and traffic.outbound("work").retries is not None
    assert PolicyView().outbound("work") is NO_OUTBOUND_POLICIES  # no policy cache at all
