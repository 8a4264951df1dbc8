"""A pattern's arguments are checked when the pattern is made, each refusal naming the argument, what it got and
what is accepted. Before, one str where a list of names belongs was split into characters (deciding wrongly and
quietly), and other wrong values were taken and failed the run later with a raw Python error, or never."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from hivemesh.sdk.patterns import (
    Branch,
    EscalationRules,
    FanOut,
    Handoff,
    PeerReview,
    Pipeline,
    Review,
    Router,
    Rule,
    Step,
    Subtask,
    Supervisor,
    handoff,
)

SUB = Subtask("s1", "answer", {})


# 1. One str where a list of names belongs is refused, never split into characters.

@pytest.mark.parametrize(("make", "argument", "name"), [
    (lambda: EscalationRules(tiers="enterprise"), "tiers", "enterprise"),
    (lambda: EscalationRules.from_dict({"tiers": "gold"}), "tiers", "gold"),
    (lambda: Rule("security-desk", keywords="phish"), "rule security-desk keywords", "phish"),
    (lambda: Router(exclude="echo"), "exclude", "echo"),
    (lambda: Subtask("a", "conf", {}, reassign_to="conf2"), "subtask a reassign_to", "conf2"),
    (lambda: PeerReview("write", "review1"), "reviewers", "review1"),
    (lambda: Pipeline("ocr"), "steps", "ocr"),
    (lambda: FanOut("search-web"), "branches", "search-web"),
    (lambda: Handoff("triage", allowed="security-desk"), "allowed", "security-desk"),
], ids=["tiers", "tiers-from-dict", "rule-keywords", "router-exclude", "reassign-to", "reviewers", "pipeline-steps",
        "fanout-branches", "handoff-allowed"])
def test_one_name_where_a_list_belongs_is_refused_not_split(make: Callable[[], Any], argument: str,
                                                            name: str) -> None:
    with pytest.raises(TypeError, match=rf"^{argument} must be a list of .*, not str '{name}' \(for one, give "
                                        rf"\['{name}'\]\)$"):
        make()


def test_the_same_names_as_a_list_decide_by_whole_names() -> None:
    """What each refused call above meant, written as a list: whole names, never letters or substrings."""
    gold = EscalationRules.from_dict({"tiers": ["gold"]})
    assert gold.tiers == ("gold",)
    assert gold.reason({"tier": "gold"}, SUB, {}, 0.9, 0) == "customer tier gold always gets a person"
    assert gold.reason({"tier": "o"}, SUB, {}, 0.9, 0) is None
    assert EscalationRules(tiers=["enterprise"]).reason({"tier": "pr"}, SUB, {}, 0.9, 0) is None
    phish = Rule("security-desk", keywords=["phish"])
    assert phish.keywords == ("phish",) and not phish.matches("I need wifi") and phish.matches("a phish mail")
    assert Router(exclude=["echo"]).exclude == frozenset({"echo"})
    assert Subtask("a", "conf", {}, reassign_to=["conf2"]).reassign_to == ("conf2",)
    assert PeerReview("write", ["review1"]).reviewers == ("review1",)
    assert Handoff("triage", allowed=("security-desk",)).allowed == frozenset({"security-desk"})


@pytest.mark.parametrize(("make", "message"), [
    (lambda: EscalationRules(tiers=("gold", 3)), r"tiers\[1\] must be a str, not int 3"),
    (lambda: Router(exclude=["echo", "Bad Cap"]), r"exclude\[1\] 'Bad Cap' is not a capability name"),
    (lambda: Subtask("a", "conf", {}, reassign_to=(None,)), r"subtask a reassign_to\[0\] must be a capability name"),
    (lambda: PeerReview("write", ["review1", 7]), r"reviewers\[1\] must be a capability name"),
    (lambda: Handoff("triage", allowed={"x": 1}), "allowed must be a list of capability names, not dict"),
    (lambda: Rule("desk", keywords=("phish", " ")), r"rule desk keywords\[1\] is blank"),
    (lambda: Router(rules=Rule("desk", keywords=("phish",))), "rules must be a list of Rule objects, not Rule"),
    (lambda: Router(rules=[{"capability": "desk"}]), r"rules\[0\] must be a Rule, not dict"),
], ids=["tier-number", "exclude-name", "reassign-none", "reviewer-number", "allowed-dict", "blank-keyword",
        "one-rule", "rule-dict"])
def test_each_name_in_a_list_is_checked(make: Callable[[], Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        make()


# 2. An escalation's deadline policy is checked where the rules are made, not when an escalation fires.

def test_on_deadline_must_be_reject_or_default() -> None:
    with pytest.raises(ValueError, match=r"^on_deadline must be 'reject' .* or 'default' .*, not str 'maybe'$"):
        EscalationRules(on_deadline="maybe")
    with pytest.raises(ValueError, match="on_deadline"):
        EscalationRules.from_dict({"on_deadline": "later"})
    assert EscalationRules(on_deadline="default", default_answer="no").on_deadline == "default"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("min_confidence", "0.7", "min_confidence must be a number within 0..1, or None"),
    ("min_confidence", math.nan, "min_confidence must be a number within 0..1"),
    ("max_errors", 1.5, "max_errors must be an int >= 0, not float 1.5"),
    ("max_errors", True, "max_errors must be an int >= 0, not bool True"),
    ("escalate_sensitive", "no", "escalate_sensitive must be True or False, not str 'no'"),
    ("tier_field", 3, "tier_field must be a str, not int 3"),
    ("deadline_s", True, "deadline_s must be in"),
])
def test_other_escalation_rule_fields_are_checked(field: str, value: Any, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        EscalationRules.from_dict({field: value})


def test_escalation_rules_from_something_not_an_object() -> None:
    with pytest.raises(TypeError, match=r"escalation rules must be an object of rule fields, not list"):
        EscalationRules.from_dict([("tiers", ["gold"])])
    with pytest.raises(ValueError, match="unknown escalation rule fields: 1, tierz"):
        EscalationRules.from_dict({"tierz": [], 1: 2})


def test_an_escalation_policy_returning_no_reason_is_a_clear_error() -> None:
    rules = EscalationRules(tiers=(), min_confidence=None, policy=lambda *_: True)
    with pytest.raises(TypeError, match=r"escalation policy returned bool True, not a reason \(a str\) or None"):
        rules.reason({}, SUB, {}, None, 0)
    assert EscalationRules(tiers=(), policy=lambda *_: "why").reason({}, SUB, {}, None, 0) == "why"


# 3. Other wrong types: a clear error when the pattern is made, not an AttributeError or a failed run later.

@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: Pipeline([1]), TypeError, r"^steps\[0\] must be a Step or a capability name, not int 1$"),
    (lambda: FanOut([None]), TypeError, r"^branches\[0\] must be a Branch or a capability name, not NoneType None$"),
    (lambda: FanOut(["search-web", 2]), TypeError, r"branches\[1\] must be a Branch or a capability name, not int"),
    (lambda: FanOut(all_instances_of="Bad Cap"), ValueError,
     r"^all_instances_of 'Bad Cap' is not a capability name \(\[a-z0-9\]"),
    (lambda: Supervisor("Bad Cap"), ValueError, r"^decompose 'Bad Cap' is not a capability name"),
    (lambda: Supervisor(None), TypeError,
     r"^decompose must be a function \(task → list of Subtask\) or a capability name, not NoneType None$"),
    (lambda: Supervisor("plan", review="Bad Cap"), ValueError, "review 'Bad Cap' is not a capability name"),
    (lambda: Supervisor("plan", review=3), TypeError, "review must be a function"),
    (lambda: Supervisor("plan", rules={"tiers": []}), TypeError,
     r"rules must be EscalationRules \(EscalationRules.from_dict reads a JSON document\), not dict"),
    (lambda: Supervisor("plan", combine="sum"), TypeError, "combine must be a function"),
    (lambda: Supervisor("plan", attempts_per_assignee=1.5), ValueError,
     "attempts_per_assignee must be an int >= 1, not float 1.5"),
    (lambda: PeerReview("write", ["review"], max_rounds=1.5), ValueError, "^max_rounds must be an int >= 1, not float"),
    (lambda: PeerReview("Write", ["review"]), ValueError, "^writer 'Write' is not a capability name"),
    (lambda: PeerReview("write", ["review"], on_round=[]), TypeError, "on_round must be a function"),
    (lambda: Handoff("triage", max_handoffs=True), ValueError, "max_handoffs must be an int >= 0, not bool True"),
    (lambda: Handoff(None), TypeError, "^entry must be a capability name"),
    (lambda: Router(fallback="Help Desk"), ValueError, "^fallback 'Help Desk' is not a capability name"),
    (lambda: Router(min_score="high"), ValueError, "^min_score must be a number >= 0.0, not str 'high'$"),
    (lambda: Router(multi_ratio=math.nan), ValueError, r"^multi_ratio must be a number within 0.0..1.0, not float"),
    (lambda: Router(multi="yes"), TypeError, "^multi must be True or False"),
    (lambda: Router(text="text"), TypeError, "^text must be a function"),
    (lambda: Router(embedder=5), TypeError, "^embedder must be an Embedder"),
    (lambda: Router(embedder="bert"), ValueError, "embedder must be 'auto', 'minilm' or 'hashing', not 'bert'"),
    (lambda: Rule("desk", pattern="(unclosed"), ValueError, "rule desk pattern '.unclosed' is not a regular expr"),
    (lambda: Step("ocr", ask_human="no"), TypeError, "step ocr ask_human must be True or False"),
    (lambda: Step("ocr", stop_if="valid"), TypeError, "step ocr stop_if must be a function"),
    (lambda: Branch("search", input={"q": 1}), TypeError, "branch search input must be a function"),
    (lambda: Review("no"), TypeError, "Review approved must be True or False, not str 'no'"),
    (lambda: Review(True, "high"), TypeError, "Review confidence must be a number"),
    (lambda: Subtask("a", "conf", {}, sensitive="false"), TypeError, "subtask a sensitive must be True or False"),
    (lambda: Subtask(7, "conf", {}), TypeError, "subtask id must be a str, not int 7"),
    (lambda: FanOut(["a"], name=""), ValueError, "name must be a non-empty str"),
], ids=lambda v: v[:40] if isinstance(v, str) else None)
def test_wrong_arguments_are_refused_when_the_pattern_is_made(make: Callable[[], Any], error: type[Exception],
                                                              message: str) -> None:
    with pytest.raises(error, match=message):
        make()


_TIMEOUTS: list[tuple[str, Callable[[Any], Any]]] = [
    ("branch_timeout", lambda t: FanOut(["search-web"], branch_timeout=t)),
    ("branch search-web timeout", lambda t: Branch("search-web", timeout=t)),
    ("step ocr timeout", lambda t: Step("ocr", timeout=t)),
    ("timeout", lambda t: Supervisor("plan", timeout=t)),
    ("timeout", lambda t: Router(timeout=t)),
    ("timeout", lambda t: PeerReview("write", ["review"], timeout=t)),
    ("timeout", lambda t: Handoff("triage", timeout=t)),
]


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0, -1.0, True, "5"])
@pytest.mark.parametrize(("argument", "make"), _TIMEOUTS, ids=[f"{i}-{a}" for i, (a, _) in enumerate(_TIMEOUTS)])
def test_every_timeout_is_a_finite_positive_number_of_seconds_or_none(argument: str, make: Callable[[Any], Any],
                                                                      bad: Any) -> None:
    """FanOut(branch_timeout=nan) was accepted and then failed every branch; each pattern timeout is held to the
    same rule."""
    with pytest.raises(ValueError, match=rf"^{argument} must be a finite number of seconds > 0, or None, not "):
        make(bad)
    make(None)
    make(0.5)


def test_handoff_refuses_a_context_that_is_no_object() -> None:
    with pytest.raises(TypeError, match=r"^handoff context must be an object .*, not list \[1, 2\]$"):
        handoff("security-desk", context=[1, 2])
    with pytest.raises(TypeError, match=r"^handoff to must be a capability name"):
        handoff(None)
    assert handoff("security-desk", context={"ticket": 1})["handoff"]["context"] == {"ticket": 1}


def test_a_router_text_function_must_give_text() -> None:
    """Router(text=lambda r: 5) failed inside the routing with `'int' object has no attribute 'lower'`."""
    with pytest.raises(TypeError, match=r"^the router's text function returned int 5, not a str"):
        Router(text=lambda _r: 5).text_of({"text": "hi"})
    assert Router(text=lambda r: r["body"]).text_of({"body": "vpn down"}) == "vpn down"
