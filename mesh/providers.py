"""Capability providers (`kind: providers`): which agent identities may serve which capabilities.

    kind: providers
    name: pipeline
    spec:
      rules:
        - capabilities: ["extract"]                                # capability globs
          agents: ["spiffe://hivemesh.local/agent/extractor"]      # SPIFFE id globs, as authz's from/to match

Why: any agent that joined the mesh registers under its own name and may declare any capability, and the
registry only binds an entry to its own agent's identity. Without this kind, an agent `mallory` registering
`extract` is balanced with the genuine extractor and receives its share of every caller's calls, with their data.

Semantics (opt-in, so a mesh without the kind routes as before):
- A capability that at least one rule of any providers document matches may be served only by the agents
  those rules name (the union over every matching rule, across documents).
- A capability no rule matches is open: any registered instance may serve it.

Enforced by every caller, where it reads the registry (`hivemesh.mesh.registry.RegistryView.instances`, which
selection, fan-out lists and the sidecar's Resolve all read): an instance whose identity may not serve the
capability is never dialled and never sent a token. The agents' inbound side does not check it: the squatter is
the agent itself. `ProvidersTable.restriction` is a dict lookup after the first look at a capability.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from hivemesh.mesh.globs import Globs  # the same glob matching as authz's from/to
from hivemesh.mesh.pki import SCHEME, parse_spiffe_id
from hivemesh.mesh.policy import Mistakes, PolicyDoc, PolicyError, PolicyKind

KIND_NAME: Final = "providers"
_GLOB_CHARS: Final = "*?["
_CAPABILITY_GLOB: Final = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"^[a-z0-9*?.\[\]!_-]+$"}
_AGENT_GLOB: Final = {"type": "string", "minLength": 1, "maxLength": 512}
SPEC_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["rules"],
    "additionalProperties": False,
    "properties": {
        "rules": {
            "type": "array",
            "minItems": 1,
            "maxItems": 512,
            "items": {
                "type": "object",
                "required": ["capabilities", "agents"],
                "additionalProperties": False,
                "properties": {
                    "description": {"type": "string", "maxLength": 1024},
                    "capabilities": {"type": "array", "minItems": 1, "maxItems": 256, "uniqueItems": True,
                                     "items": _CAPABILITY_GLOB},
                    "agents": {"type": "array", "minItems": 1, "maxItems": 256, "uniqueItems": True,
                               "items": _AGENT_GLOB},
                },
            },
        },
    },
}
CACHE_MAX: Final = 4096
"""Capabilities whose restriction one table remembers: past this it forgets them all and starts again (callers
name capabilities, so the cache must not grow with whatever names they try)."""


@dataclass(frozen=True)
class ProviderRule:
    """One rule: the agents it names may serve the capabilities it matches."""

    policy: str
    index: int
    capabilities: Globs
    agents: Globs
    agent_globs: tuple[str, ...]

    @property
    def ref(self) -> str:
        return f"{KIND_NAME}/{self.policy} rules[{self.index}]"


@dataclass(frozen=True)
class Restriction:
    """Who may serve one capability: the agents named by every rule matching it."""

    capability: str
    agents: Globs
    agent_globs: tuple[str, ...]
    rules: tuple[str, ...]
    """The matching rules' refs (`providers/<name> rules[<i>]`)."""
    policies: tuple[str, ...]
    """The matching documents' names, sorted."""

    def allows(self, identity: str) -> bool:
        return self.agents.match(identity)

    def describe(self) -> str:
        """"providers/pipeline lets only spiffe://…/agent/extractor serve 'extract'", for operators."""
        docs = ", ".join(f"{KIND_NAME}/{p}" for p in self.policies)
        who = ", ".join(self.agent_globs[:4]) + (f" (+{len(self.agent_globs) - 4} more)"
                                                  if len(self.agent_globs) > 4 else "")
        return f"{docs} let{'s' if len(self.policies) == 1 else ''} only {who} serve {self.capability!r}"


@dataclass(frozen=True, eq=False)
class ProvidersTable:
    """Every providers rule in force, compiled; immutable but for a memo of each capability's restriction."""

    rules: tuple[ProviderRule, ...] = ()
    policies: tuple[str, ...] = ()
    _memo: dict[str, Restriction | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def empty(self) -> bool:
        return not self.rules

    def restriction(self, capability: str) -> Restriction | None:
        """Who may serve capability, or None when no rule matches it (open: any instance may serve it)."""
        if not self.rules:
            return None
        memo = self._memo
        try:
            return memo[capability]
        except KeyError:
            pass
        found = _restriction(self.rules, capability)
        if len(memo) >= CACHE_MAX:
            memo.clear()
        memo[capability] = found
        return found

    def allows(self, capability: str, identity: str) -> bool:
        """Whether the workload identity may serve capability."""
        found = self.restriction(capability)
        return found is None or found.allows(identity)


def _restriction(rules: Iterable[ProviderRule], capability: str) -> Restriction | None:
    matching = [r for r in rules if r.capabilities.match(capability)]
    if not matching:
        return None
    globs = tuple(dict.fromkeys(g for r in matching for g in r.agent_globs))
    return Restriction(capability, Globs(globs), globs, tuple(r.ref for r in matching),
                       tuple(sorted({r.policy for r in matching})))


# --- the policy kind --------------------------------------------------------------------------------------------
def check_document(doc: PolicyDoc) -> None:
    """Every agent glob must be able to match an agent's SPIFFE id: a bare name (`extractor`) or a client's id
    would match no agent, and the capability would then have no provider at all. Every such glob is named at once
    (`Mistakes`), and a spec the schema refused is judged only where it is well formed (`check_any_spec`)."""
    found = Mistakes()
    example = "e.g. spiffe://hivemesh.local/agent/extractor or spiffe://hivemesh.local/agent/extract-*"
    rules = doc.spec.get("rules") if isinstance(doc.spec, dict) else None
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        agents = rule.get("agents") if isinstance(rule, dict) else None
        for j, glob in enumerate(agents if isinstance(agents, list) else []):
            if not isinstance(glob, str):
                continue  # the schema names it
            where = f"spec.rules[{i}].agents[{j}]"
            if not glob.startswith(SCHEME):
                found.add(where, f"must be a SPIFFE id glob of agents ({example}), got {glob[:80]!r}")
                continue
            if any(c in glob for c in _GLOB_CHARS):
                # A glob: its kind segment, when written out, must still be `agent` (`.../client/validator*`
                # could never match an agent, and the capability would be left with no provider).
                segments = glob[len(SCHEME):].split("/")
                kind_part = segments[1] if len(segments) > 2 else None
                if kind_part is not None and not any(c in kind_part for c in _GLOB_CHARS) and kind_part != "agent":
                    found.add(where, f"names {kind_part} identities, which serve nothing: only agents serve "
                                     f"capabilities ({example})")
                continue
            try:
                kind = parse_spiffe_id(glob).kind
            except ValueError as exc:
                found.add(where, f"{exc}; {example}")
                continue
            if kind != "agent":
                found.add(where, f"names a {kind}, which serves nothing: only agents serve capabilities ({example})")
    found.raise_any()


def compile_providers(docs: Mapping[str, PolicyDoc]) -> ProvidersTable:
    """All providers documents → one table (documents by name, rules in order; no two documents conflict: a
    capability matched by several rules may be served by every agent they name)."""
    rules: list[ProviderRule] = []
    for name in sorted(docs):
        for i, raw in enumerate(docs[name].spec.get("rules", [])):
            if not raw["capabilities"] or not raw["agents"]:
                raise PolicyError(f"spec.rules[{i}]", "names no capability or no agent")
            rules.append(ProviderRule(name, i, Globs(raw["capabilities"]), Globs(raw["agents"]), tuple(raw["agents"])))
    return ProvidersTable(tuple(rules), tuple(sorted(docs)))


PROVIDERS: Final[PolicyKind[ProvidersTable]] = PolicyKind(
    name=KIND_NAME,
    spec_schema=SPEC_SCHEMA,
    compile=compile_providers,
    check=check_document,
    check_any_spec=True,
    description="which agent identities may serve which capabilities (capabilities no rule names stay open)",
)

EMPTY: Final = ProvidersTable()
"""The table in force when no providers policy exists: every capability is open."""
