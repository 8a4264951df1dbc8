"""Authorization policy (`kind: authz`): who may call which capability, evaluated on every inbound call.

    kind: authz
    name: pipeline
    spec:
      mode: enforce                 # or dry-run: evaluated and audited ("would deny"), never enforced
      teams:                        # team name -> SPIFFE id globs (operator-defined, see below)
        billing: ["spiffe://hivemesh.local/agent/invoice-*"]
      rules:
        - name: demo-runs-the-pipeline
          action: ALLOW             # ALLOW | DENY | CUSTOM (an in-process provider decides)
          from:                     # every field given must match; a list matches if any item does
            callers: ["spiffe://hivemesh.local/client/demo"]      # the peer's SPIFFE id (who presents)
            principals: ["spiffe://hivemesh.local/client/*"]      # the original principal (delegation)
            teams: [billing]        # also not_callers, not_principals, not_teams
          to:
            agents: ["spiffe://hivemesh.local/agent/*"]           # which agents the rule is about
            capabilities: ["ocr", "extract*"]                     # globs; also not_capabilities
            actions: [invoke, stream]                             # invoke | stream | describe

Semantics, stricter than Istio where hivemesh departs from it:
- **Default deny**: with no authz policy at all, every call is denied (Istio allows when no policy exists).
- CUSTOM rules first, then DENY, then ALLOW: any matching DENY wins over every ALLOW; a call no ALLOW rule
  matches is denied. A CUSTOM rule whose provider is not registered in this process denies (fail closed).
- An attribute the call does not have (no principal or capability on Describe) makes a DENY condition on it
  match and an ALLOW condition on it fail: missing information never opens a door.
- Teams are defined by the operator in policies, never taken from an agent's self-declared card: a workload
  must not be able to grant itself a team by registering a label.
- Dry-run policies are evaluated in the shadow of the enforced ones: when the enforced decision allows a call
  that the policies *including* the dry-run ones would deny, the audit record says so (`dry_run`), nothing
  is refused. That is how a new DENY (or a narrower ALLOW) is trialled before it is enforced.

Compiled once per change (each list to a `Globs`: names in a set, real globs in one regex), evaluated from memory by
the inbound layer `hivemesh.mesh.layers.authz.AuthzLayer`, which caches decisions until the policies change.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from hivemesh.mesh.globs import Globs
from hivemesh.mesh.layers.authn import ACTION_OF_METHOD
from hivemesh.mesh.pki import parse_spiffe_id
from hivemesh.mesh.policy import Mistakes, PolicyDoc, PolicyKind

ALLOW: Final = "ALLOW"
DENY: Final = "DENY"
CUSTOM: Final = "CUSTOM"
_NAME = "^[a-z0-9][a-z0-9._-]{0,62}$"
_GLOBS = {"type": "array", "minItems": 1, "maxItems": 256,
          "items": {"type": "string", "minLength": 1, "maxLength": 512}}
_NAMES = {"type": "array", "minItems": 1, "maxItems": 64, "items": {"type": "string", "pattern": _NAME}}
_FROM_FIELDS: Final = ("callers", "not_callers", "principals", "not_principals", "teams", "not_teams")
_TO_FIELDS: Final = ("agents", "capabilities", "not_capabilities", "actions")
SPEC_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["rules"],
    "additionalProperties": False,
    "properties": {
        "mode": {"enum": ["enforce", "dry-run"]},
        "teams": {"type": "object", "maxProperties": 256, "propertyNames": {"pattern": _NAME},
                  "additionalProperties": _GLOBS},
        "rules": {
            "type": "array",
            "maxItems": 512,
            "items": {
                "type": "object",
                "required": ["name", "action"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": _NAME},
                    "description": {"type": "string", "maxLength": 1024},
                    "action": {"enum": [ALLOW, DENY, CUSTOM]},
                    "provider": {"type": "string", "pattern": _NAME},
                    "from": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "callers": _GLOBS, "not_callers": _GLOBS, "principals": _GLOBS,
                            "not_principals": _GLOBS, "teams": _NAMES, "not_teams": _NAMES,
                        },
                    },
                    "to": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "agents": _GLOBS, "capabilities": _GLOBS, "not_capabilities": _GLOBS,
                            "actions": {"type": "array", "minItems": 1,
                                        "items": {"enum": sorted(set(ACTION_OF_METHOD.values()))}},
                        },
                    },
                },
            },
        },
    },
}


# --- requests and decisions -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuthzRequest:
    """What a decision is about."""

    caller: str
    """The peer's SPIFFE id (the identity presenting the token)."""
    capability: str | None
    action: str
    agent: str
    """The target agent's SPIFFE id."""
    principal: str | None = None
    """The original principal (token `sub`); None when the call has no token (Describe)."""
    chain: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str
    """`policy/rule` that decided, or "" for the default."""
    reason: str
    would_deny: str = ""
    """Dry run: the `policy/rule` that would deny an allowed call (or "default" when nothing would allow it)."""


CustomProvider = Callable[[AuthzRequest], "bool | str | None"]
"""A CUSTOM rule's decider: True/None allows, False or a string (the reason) denies. It must be fast and pure."""
_PROVIDERS: dict[str, CustomProvider] = {}
_providers_lock = threading.Lock()


def register_custom_provider(name: str, provider: CustomProvider) -> None:
    """Make provider answer CUSTOM rules naming it, in this process (e.g. a classifier, an external PDP cache)."""
    with _providers_lock:
        _PROVIDERS[name] = provider


def unregister_custom_provider(name: str) -> None:
    with _providers_lock:
        _PROVIDERS.pop(name, None)


# --- compiled rules -------------------------------------------------------------------------------------------------
def _globs(values: Iterable[str] | None) -> Globs | None:
    """None when the rule leaves the field out: no condition on it (the schema refuses an empty list)."""
    if not values:
        return None
    return Globs(values)


def _match(pattern: Globs | None, value: str | None, *, deny: bool) -> bool:
    if pattern is None:
        return True
    if value is None:
        return deny  # a missing attribute matches a DENY condition (fail closed) and fails an ALLOW one
    return pattern.match(value)


def _not_match(pattern: Globs | None, value: str | None, *, deny: bool) -> bool:
    if pattern is None:
        return True
    if value is None:
        return deny
    return not pattern.match(value)


@dataclass(frozen=True)
class Rule:
    policy: str
    name: str
    action: str
    provider: str = ""
    callers: Globs | None = None
    not_callers: Globs | None = None
    principals: Globs | None = None
    not_principals: Globs | None = None
    teams: frozenset[str] | None = None
    not_teams: frozenset[str] | None = None
    agents: Globs | None = None
    capabilities: Globs | None = None
    not_capabilities: Globs | None = None
    actions: frozenset[str] | None = None
    source: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.policy}/{self.name}"

    def mismatch(self, req: AuthzRequest, teams: frozenset[str]) -> str | None:
        """Why the rule does not match req, or None when it matches."""
        deny = self.action != ALLOW
        if not _match(self.agents, req.agent, deny=False):
            return "to.agents"
        if not _match(self.callers, req.caller, deny=deny):
            return "from.callers"
        if not _not_match(self.not_callers, req.caller, deny=deny):
            return "from.not_callers"
        if not _match(self.principals, req.principal, deny=deny):
            return "from.principals"
        if not _not_match(self.not_principals, req.principal, deny=deny):
            return "from.not_principals"
        if self.teams is not None and not (self.teams & teams):
            return "from.teams"
        if self.not_teams is not None and self.not_teams & teams:
            return "from.not_teams"
        if not _match(self.capabilities, req.capability, deny=deny):
            return "to.capabilities"
        if not _not_match(self.not_capabilities, req.capability, deny=deny):
            return "to.not_capabilities"
        if self.actions is not None and req.action not in self.actions:
            return "to.actions"
        return None


def _rule(policy: str, raw: Mapping[str, Any]) -> Rule:
    frm: Mapping[str, Any] = raw.get("from", {})
    to: Mapping[str, Any] = raw.get("to", {})
    return Rule(
        policy=policy, name=raw["name"], action=raw["action"], provider=raw.get("provider", ""),
        callers=_globs(frm.get("callers")), not_callers=_globs(frm.get("not_callers")),
        principals=_globs(frm.get("principals")), not_principals=_globs(frm.get("not_principals")),
        teams=frozenset(frm["teams"]) if "teams" in frm else None,
        not_teams=frozenset(frm["not_teams"]) if "not_teams" in frm else None,
        agents=_globs(to.get("agents")), capabilities=_globs(to.get("capabilities")),
        not_capabilities=_globs(to.get("not_capabilities")),
        actions=frozenset(to["actions"]) if "actions" in to else None,
        source=raw,
    )


@dataclass(frozen=True)
class AuthzTable:
    """Every authz policy in force, compiled. `decide` is pure; it reads only this immutable table."""

    enforce: tuple[Rule, ...] = ()
    dry_run: tuple[Rule, ...] = ()
    teams: tuple[tuple[str, Globs], ...] = ()
    policies: tuple[str, ...] = ()
    has_custom: bool = False

    @property
    def empty(self) -> bool:
        return not self.policies

    def for_agent(self, agent: str) -> AuthzTable:
        """Only the rules about agent (precomputed per node: its identity never changes)."""
        def keep(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
            return tuple(r for r in rules if r.agents is None or r.agents.match(agent))

        return AuthzTable(keep(self.enforce), keep(self.dry_run), self.teams, self.policies, self.has_custom)

    def teams_of(self, caller: str) -> frozenset[str]:
        return frozenset(team for team, pattern in self.teams if pattern.match(caller))

    def decide(self, req: AuthzRequest) -> Decision:
        teams = self.teams_of(req.caller)
        decision = _evaluate(self.enforce, req, teams, empty=self.empty)
        if decision.allowed and self.dry_run:
            shadow = _evaluate(self.enforce + self.dry_run, req, teams, empty=False)
            if not shadow.allowed:
                return Decision(True, decision.rule, decision.reason, would_deny=shadow.rule or "default")
        return decision

    def explain(self, req: AuthzRequest) -> list[dict[str, str]]:
        """Each rule, in evaluation order, with whether it matched and, if not, the first condition that failed."""
        teams = self.teams_of(req.caller)
        out = []
        for mode, rules in (("enforce", self.enforce), ("dry-run", self.dry_run)):
            for r in _ordered(rules):
                why = r.mismatch(req, teams)
                out.append({"rule": r.ref, "action": r.action, "mode": mode,
                            "matched": "yes" if why is None else "no", "failed": why or ""})
        return out


_CAPABILITY_NAME: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_HINT_MAX_CHARS: Final = 200


def _short_id(spiffe: str, trust_domain: str) -> str | None:
    """spiffe as `hivemesh allow` takes it: KIND/NAME in trust_domain (the operator's), the full id elsewhere;
    None for anything that is not a workload id (nothing to suggest)."""
    try:
        parsed = parse_spiffe_id(spiffe)
    except ValueError:
        return None
    return f"{parsed.kind}/{parsed.name}" if parsed.trust_domain == trust_domain else str(parsed)


def allow_hint(caller: str, capabilities: Sequence[str], agent: str) -> str:
    """"; an operator allows it with `hivemesh allow CALLER CAP... --agent AGENT`": the documented fix
    (docs/security.md, `hivemesh allow --help`) that a default-deny or grant refusal names, so whoever reads it
    knows what to ask for; "" when there is none to give. No capabilities (or a list too long for one clause) is
    written CAPABILITY...: the operator chooses, rather than a hint that grants more than the call needs. Only
    valid identities and capability names go in: the caller chose the names, and an operator may paste the command."""
    try:
        trust_domain = parse_spiffe_id(agent).trust_domain
    except ValueError:
        return ""
    who, where = _short_id(caller, trust_domain), _short_id(agent, trust_domain)
    caps = list(dict.fromkeys(capabilities))
    if who is None or where is None or not all(_CAPABILITY_NAME.fullmatch(c) for c in caps):
        return ""
    names = " ".join(caps)
    if not caps or len(names) > _HINT_MAX_CHARS:
        names = "CAPABILITY..."
    return f"; an operator allows it with `hivemesh allow {who} {names} --agent {where}`"


def _default_deny_hint(req: AuthzRequest) -> str:
    return allow_hint(req.caller, [req.capability], req.agent) if req.capability else ""


def _ordered(rules: Sequence[Rule]) -> list[Rule]:
    order = {CUSTOM: 0, DENY: 1, ALLOW: 2}
    return sorted(rules, key=lambda r: order[r.action])


def _evaluate(rules: Sequence[Rule], req: AuthzRequest, teams: frozenset[str], *, empty: bool) -> Decision:
    what = f"{req.caller} {req.action} {req.capability or '(no capability)'} on {req.agent}"
    if empty:
        return Decision(False, "", f"no authz policy exists, so every call is denied (default deny): {what}"
                                   + _default_deny_hint(req))
    for r in rules:
        if r.action != CUSTOM or r.mismatch(req, teams) is not None:
            continue
        provider = _PROVIDERS.get(r.provider)
        if provider is None:
            return Decision(False, r.ref, f"{r.ref}: custom provider {r.provider!r} is not available (fail closed)")
        try:
            verdict = provider(req)
        except Exception as exc:  # noqa: BLE001 - a failing provider denies
            return Decision(False, r.ref, f"{r.ref}: custom provider {r.provider!r} failed: {exc}")
        if verdict is False or isinstance(verdict, str):
            return Decision(False, r.ref, f"{r.ref} denies {what}" + (f": {verdict}" if verdict else ""))
    for r in rules:
        if r.action == DENY and r.mismatch(req, teams) is None:
            return Decision(False, r.ref, f"{r.ref} denies {what}")
    for r in rules:
        if r.action == ALLOW and r.mismatch(req, teams) is None:
            return Decision(True, r.ref, f"{r.ref} allows {what}")
    return Decision(False, "", f"no authz rule allows {what} (default deny)" + _default_deny_hint(req))


# --- the policy kind --------------------------------------------------------------------------------------------
def check_document(doc: PolicyDoc) -> None:
    """Per-document checks beyond the schema: unique rule names, providers only (and always) on CUSTOM. PolicyError
    names every mistake found (`Mistakes`), not only the first."""
    found = Mistakes()
    seen: dict[str, int] = {}
    for i, rule in enumerate(doc.spec.get("rules", [])):
        where = f"spec.rules[{i}]"
        if rule["name"] in seen:
            found.add(f"{where}.name", f"duplicate rule name (also rules[{seen[rule['name']]}])")
        else:
            seen[rule["name"]] = i
        if rule["action"] == CUSTOM and not rule.get("provider"):
            found.add(f"{where}.provider", "a CUSTOM rule names its provider")
        if rule["action"] != CUSTOM and "provider" in rule:
            found.add(f"{where}.provider", "only CUSTOM rules have a provider")
    found.raise_any()


def compile_authz(docs: Mapping[str, PolicyDoc]) -> AuthzTable:
    """All authz documents → one table; a team used but defined nowhere refuses the whole set: PolicyError names
    every such use, in the document it is in (`Mistakes`)."""
    teams: dict[str, list[str]] = {}
    for doc in docs.values():
        for team, globs in doc.spec.get("teams", {}).items():
            teams.setdefault(team, []).extend(globs)
    enforce: list[Rule] = []
    dry: list[Rule] = []
    undefined = Mistakes()
    for name in sorted(docs):
        doc = docs[name]
        for i, raw in enumerate(doc.spec.get("rules", [])):
            for fld in ("teams", "not_teams"):
                for j, team in enumerate(raw.get("from", {}).get(fld, [])):
                    if team not in teams:
                        undefined.add(f"spec.rules[{i}].from.{fld}[{j}]",
                                      f"team {team!r} is defined in no authz policy (spec.teams)", document=name)
            (dry if doc.spec.get("mode") == "dry-run" else enforce).append(_rule(name, raw))
    undefined.raise_any()
    compiled_teams = tuple((t, Globs(globs)) for t, globs in sorted(teams.items()))
    return AuthzTable(
        enforce=tuple(_ordered(enforce)), dry_run=tuple(_ordered(dry)), teams=compiled_teams,
        policies=tuple(sorted(docs)), has_custom=any(r.action == CUSTOM for r in enforce + dry),
    )


AUTHZ: Final[PolicyKind[AuthzTable]] = PolicyKind(
    name="authz",
    spec_schema=SPEC_SCHEMA,
    compile=compile_authz,
    check=check_document,
    description="who may call which capability (default deny; DENY before ALLOW; dry-run mode)",
)


EMPTY: Final = AuthzTable()
"""The table in force when no authz policy exists: it denies everything."""
