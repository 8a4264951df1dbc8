"""`mesh/globs.py`, and the grants, budget rules, rate-limit overrides and authz rules built on it, match names
and globs exactly as `fnmatch.fnmatchcase` would, whether a pattern is a plain name (looked up in a set) or a glob
(compiled), in a list of a few patterns or of 50,000."""

from __future__ import annotations

import fnmatch

from hypothesis import given, settings
from hypothesis import strategies as st

from hivemesh.controlplane.grants import Grant, GrantSet
from hivemesh.mesh.authz import AUTHZ, AuthzRequest, compile_authz
from hivemesh.mesh.budget import BudgetRule
from hivemesh.mesh.globs import Globs
from hivemesh.mesh.policy import PolicyDoc
from hivemesh.mesh.resilience.kinds import RATELIMITS
from hivemesh.mesh.resilience.ratelimit import RateLimitPolicy

_alphabet = st.sampled_from("ab.:/-*?[]!^\\")
_patterns = st.lists(st.text(_alphabet, min_size=1, max_size=6), min_size=1, max_size=5)
_texts = st.text(st.sampled_from("ab.:/-*?[]!^\\"), max_size=6)


@settings(max_examples=400, deadline=None)
@given(subjects=_patterns, capabilities=_patterns, audiences=st.none() | _patterns, subject=_texts,
       audience=_texts, capability=_texts)
def test_matching_is_fnmatchcase_for_names_and_globs(subjects: list[str], capabilities: list[str],
                                                     audiences: list[str] | None, subject: str, audience: str,
                                                     capability: str) -> None:
    grant = Grant("g", tuple(subjects), tuple(audiences) if audiences else None, tuple(capabilities))

    def any_of(patterns: list[str], text: str) -> bool:
        return any(fnmatch.fnmatchcase(text, p) for p in patterns)

    assert grant.names_subject(subject) == any_of(subjects, subject)
    assert grant.allows(capability) == any_of(capabilities, capability)
    assert grant.matches(subject, audience) == (any_of(subjects, subject)
                                                and (not audiences or any_of(audiences, audience)))
    assert GrantSet([grant]).may_ever(subject, capability) == (any_of(subjects, subject)
                                                                and any_of(capabilities, capability))


def test_a_grant_of_many_names_and_one_glob_matches_each_and_nothing_else() -> None:
    names = [f"spiffe://hivemesh.local/client/c-{i:05d}" for i in range(50_000)]
    grant = Grant("everyone", (*names, "spiffe://hivemesh.local/agent/*"), None, ("read",))
    assert grant.names_subject(names[0]) and grant.names_subject(names[-1])
    assert grant.names_subject("spiffe://hivemesh.local/agent/alpha")
    assert not grant.names_subject("spiffe://hivemesh.local/client/c-50000")
    assert not grant.names_subject(names[7] + "x") and not grant.names_subject(names[7][:-1])


@settings(max_examples=200, deadline=None)
@given(subjects=_patterns, capabilities=_patterns, subject=_texts, capability=_texts)
def test_a_budget_rule_applies_as_fnmatchcase_says(subjects: list[str], capabilities: list[str], subject: str,
                                                  capability: str) -> None:
    rule = BudgetRule("b[0]", tuple(subjects), tuple(capabilities), max_tokens=1)
    assert rule.applies(subject, capability) == (any(fnmatch.fnmatchcase(subject, p) for p in subjects)
                                                 and any(fnmatch.fnmatchcase(capability, p) for p in capabilities))


def test_an_empty_list_matches_nothing() -> None:
    assert not Globs(()).match("") and not Globs(()).match("anything")


def _ratelimit(overrides: list[dict[str, object]]) -> RateLimitPolicy:
    """A ratelimits document as `hivemesh policy apply` stores it, validated and compiled as every node does."""
    spec = {"agents": ["a"], "capabilities": ["c"], "per_identity_rps": 1, "overrides": overrides}
    doc = RATELIMITS.validate(PolicyDoc("ratelimits", "r", spec))
    policy = RATELIMITS.compile({"r": doc}).lookup("c", "a")
    assert isinstance(policy, RateLimitPolicy)
    return policy


@settings(max_examples=200, deadline=None)
@given(first=_patterns, second=_patterns, identity=_texts)
def test_a_rate_limit_override_applies_as_fnmatchcase_says_the_first_matching_one_wins(
    first: list[str], second: list[str], identity: str
) -> None:
    policy = _ratelimit([{"identities": first, "rps": 10}, {"identities": second, "rps": 20}])
    expected = (10 if any(fnmatch.fnmatchcase(identity, p) for p in first)
                else 20 if any(fnmatch.fnmatchcase(identity, p) for p in second) else 1)
    assert policy.identity_rate(identity) == expected


def test_an_override_of_many_identities_rates_each_and_nothing_else() -> None:
    names = [f"spiffe://hivemesh.local/client/c-{i:05d}" for i in range(50_000)]
    policy = _ratelimit([{"identities": [*names, "spiffe://hivemesh.local/agent/*"], "rps": 500}])
    assert policy.identity_rate(names[0]) == policy.identity_rate(names[-1]) == 500
    assert policy.identity_rate("spiffe://hivemesh.local/agent/alpha") == 500
    assert policy.identity_rate("spiffe://hivemesh.local/client/c-50000") == 1
    assert policy.identity_rate(names[7] + "x") == policy.identity_rate(names[7][:-1]) == 1


def _any(patterns: list[str], text: str) -> bool:
    return any(fnmatch.fnmatchcase(text, p) for p in patterns)


@settings(max_examples=300, deadline=None)
@given(team=_patterns, deny_caps=_patterns, callers=_patterns, not_callers=_patterns, caps=_patterns,
       caller=_texts, capability=_texts)
def test_authz_rules_and_teams_decide_as_fnmatchcase_says(
    team: list[str], deny_caps: list[str], callers: list[str], not_callers: list[str], caps: list[str],
    caller: str, capability: str,
) -> None:
    """A team DENY rule is judged before an ALLOW rule with callers and not_callers: each list may hold names,
    globs or both, and a DENY must stay a DENY (a matcher that answered the other way round would invert it)."""
    doc = PolicyDoc("authz", "p", {"teams": {"t": team}, "rules": [
        {"name": "deny-team", "action": "DENY", "from": {"teams": ["t"]}, "to": {"capabilities": deny_caps}},
        {"name": "allow", "action": "ALLOW", "from": {"callers": callers, "not_callers": not_callers},
         "to": {"capabilities": caps}},
    ]})
    table = compile_authz({"p": AUTHZ.validate(doc)})
    decision = table.decide(AuthzRequest(caller=caller, capability=capability, action="invoke", agent="a",
                                         principal=caller))
    denied = _any(team, caller) and _any(deny_caps, capability)
    allowed = _any(callers, caller) and not _any(not_callers, caller) and _any(caps, capability)
    assert decision.allowed == (not denied and allowed)
    assert decision.rule == ("p/deny-team" if denied else "p/allow" if allowed else "")
    assert table.teams_of(caller) == (frozenset({"t"}) if _any(team, caller) else frozenset())


def test_globs_compare_by_what_they_match_so_compiled_rules_do_too() -> None:
    assert Globs(["b", "a", "x*"]) == Globs(["a", "x*", "b"]) and len({Globs(["a"]), Globs(["a"])}) == 1
    assert Globs(["a"]) != Globs(["a", "x*"]) and Globs(["x*"]) != Globs(["y*"]) and Globs(["a"]) != "a"
