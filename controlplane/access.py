"""Access: "this caller may call this capability", as the two gates a call passes, written and explained together.

A call passes two gates, each with its own policy kind: the control plane issues the caller a capability token
only if a `grants` document allows it (read by the control plane alone), and the target node lets the call in
only if an `authz` rule allows it (read by every node). `access_documents` turns one operator statement into
one document of each kind, which `hivemesh allow` applies in one `ApplyPolicies` call (one etcd transaction:
both or neither). `explain_access` says, for `hivemesh authz check`, what each gate decides and why.

Why a command that writes the two existing kinds rather than a third `access` kind that expands into them: the
two stores stay the one source of truth each gate reads (`policy get grants NAME` and `policy get authz NAME`
show exactly what is enforced), no node or control-plane reader has to learn a new kind, and deleting or
editing one document never leaves a hidden expansion behind. docs/policies.md says the same for operators.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from hivemesh.controlplane.grants import GrantSet
from hivemesh.mesh.authz import AuthzRequest, AuthzTable
from hivemesh.mesh.errors import FailedPreconditionError
from hivemesh.mesh.pki import KINDS, SCHEME, parse_spiffe_id
from hivemesh.mesh.registry import NAME_RE as CAPABILITY_NAME_RE

_GLOB_CHARS: Final = "*?["
_NAME_MAX: Final = 63
_SHORT_FORM: Final = f"KIND/NAME (KIND one of {', '.join(sorted(KINDS))})"
_CAPABILITY_GLOB: Final = re.compile(r"(?:[a-z0-9._-]|\*|\?|\[!?[a-z0-9._-]+\])+")
"""A glob that can match capability names: their characters, `*`, `?` and `[...]` classes of them."""


def spiffe_id(value: str, trust_domain: str, *, what: str = "caller", globs: bool = False) -> str:
    """value as a full SPIFFE id: `spiffe://...` as given, or `KIND/NAME` / `TRUST_DOMAIN/KIND/NAME` completed
    with trust_domain. Anything else is refused with a message saying what to give (a caller given without
    `spiffe://` used to match no rule and be denied without a word). Globs (`client/*`) only with globs=True."""
    text = value.strip()
    if not text:
        raise ValueError(f"{what} is empty: give spiffe://{trust_domain}/{_SHORT_FORM}")
    if not text.startswith(SCHEME):
        if "://" in text:
            raise ValueError(f"{what} {value!r} is not a SPIFFE id: it must start with {SCHEME!r}")
        parts = text.split("/")
        if len(parts) == 3 and parts[0] == trust_domain:
            parts = parts[1:]
        if len(parts) != 2 or parts[0] not in KINDS:
            raise ValueError(f"{what} {value!r} is not a SPIFFE id: give spiffe://{trust_domain}/KIND/NAME or "
                             f"{_SHORT_FORM}")
        text = f"{SCHEME}{trust_domain}/{parts[0]}/{parts[1]}"
    has_glob = any(c in text for c in _GLOB_CHARS)
    if has_glob and not globs:
        raise ValueError(f"{what} {value!r} is a pattern: give one identity")
    if not has_glob:
        try:
            parse_spiffe_id(text)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
    return text


def access_name(caller: str, capabilities: Sequence[str]) -> str:
    """A document name for caller -> capabilities that is stable (applying again changes nothing) and valid."""
    tail = "-".join(caller.split("/")[-2:] + list(capabilities))
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9._-]", "-", tail.replace("*", "any").lower())).strip("-._")
    name = f"allow-{slug}"
    if len(name) > _NAME_MAX:
        digest = hashlib.sha256(f"{caller} {' '.join(capabilities)}".encode()).hexdigest()[:8]
        name = f"{name[:_NAME_MAX - 9].rstrip('-._')}-{digest}"
    return name


def capability_glob(value: str) -> str:
    """value if some capability can have that name (or, as a glob such as `search-*`, match it). A grant and a rule
    for `BAD CAP` would be stored, valid as globs, and allow nothing: a typo that says nothing, refused here."""
    has_glob = any(c in value for c in _GLOB_CHARS)
    if (CAPABILITY_NAME_RE.fullmatch(value) if not has_glob
            else len(value) <= 2 * _NAME_MAX and _CAPABILITY_GLOB.fullmatch(value)):
        return value
    raise ValueError(f"capability {value[:80]!r} is not a capability name: a name matches "
                     f"{CAPABILITY_NAME_RE.pattern} (globs such as search-* or * allowed)")


def access_documents(caller: str, capabilities: Sequence[str], *, name: str, agents: Sequence[str] = (),
                     description: str = "") -> list[dict[str, Any]]:
    """The `grants` and `authz` documents (both named name) that let caller call capabilities (on agents, or
    on any agent), ready for `ApplyPolicies`; ValueError for a capability no agent can have."""
    capabilities = [capability_glob(c) for c in capabilities]
    about = description or (f"{caller} may call {', '.join(capabilities)}"
                            + (f" on {', '.join(agents)}" if agents else "") + " (hivemesh allow)")
    grant: dict[str, Any] = {"subjects": [caller], "capabilities": list(capabilities)}
    to: dict[str, Any] = {"capabilities": list(capabilities)}
    if agents:
        grant["audiences"] = list(agents)
        to["agents"] = list(agents)
    rule = {"name": "allow", "action": "ALLOW", "from": {"callers": [caller]}, "to": to}
    return [
        {"kind": "grants", "name": name, "description": about, "spec": grant},
        {"kind": "authz", "name": name, "description": about, "spec": {"rules": [rule]}},
    ]


def claim_documents(documents: Sequence[Mapping[str, Any]], planned: Iterable[Any]) -> list[dict[str, Any]]:
    """documents, each with the `version` it must still be at when written (the store's compare-and-swap), from a
    dry run of them (planned: its applied entries, with kind, name, action and version): 0 for one to create, the
    current version for one already exactly as written here ("unchanged").

    `hivemesh allow` replaces no document it did not write: a document of that kind and name holding anything
    else ("updated" in the dry run) is someone's own (a DENY rule, the operators' grant), and overwriting it
    silently dropped what it said. Then FailedPreconditionError naming each such document, and nothing is written.
    With the versions, a writer that slips in between the dry run and the write makes the write fail instead.
    """
    actions = {(a.kind, a.name): (a.action, int(a.version)) for a in planned}
    taken = [(kind, name) for (kind, name), (action, _v) in actions.items() if action == "updated"]
    if taken:
        where = [f"{kind}/{name}" for kind, name in taken]
        name = taken[0][1]  # both documents have the one name
        get = (f"`hivemesh policy get {taken[0][0]} {name} > FILE`" if len(taken) == 1 else
               f"`hivemesh policy get KIND {name} > FILE` for KIND {' and '.join(k for k, _n in taken)}")
        msg = (f"{' and '.join(where)} already exist{'s and is' if len(taken) == 1 else ' and are'} not what this "
               "allow would write: allow replaces no document it did not write, and wrote nothing. Give another "
               f"--name, or edit {'it' if len(taken) == 1 else 'them'}: {get}, change FILE, "
               "`hivemesh policy apply -f FILE`")
        raise FailedPreconditionError(msg, field_violations={w: "exists, with other content" for w in where},
                                      metadata={"documents": ",".join(where)[:256]})
    claimed: list[dict[str, Any]] = []
    for d in documents:
        action, version = actions.get((d["kind"], d["name"]), ("created", 0))
        claimed.append({**d, "version": version if action == "unchanged" else 0})
    return claimed


@dataclass(frozen=True)
class GrantGate:
    """Gate 1: may the caller be issued a token for the capability on the agent?"""

    granted: bool
    grants: tuple[str, ...]
    """The grants that allow it (names)."""
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"granted": self.granted, "grants": list(self.grants), "reason": self.reason}


def grant_gate(grants: GrantSet, caller: str, capability: str, agent: str) -> GrantGate:
    """What the control plane's IssueToken decides for caller, capability and agent (agent may be a glob: then
    any audience the grant names counts)."""
    pattern = any(c in agent for c in _GLOB_CHARS)
    names = tuple(g.name for g in grants.grants
                  if g.allows(capability) and (g.matches(caller, agent) if not pattern else g.names_subject(caller)))
    if names:
        return GrantGate(True, names, f"grant {', '.join(names)} lets {caller} get tokens for {capability}")
    return GrantGate(False, (), f"no grant lets {caller} get a token for {capability} on {agent}: the control "
                                f"plane refuses the token before any node sees the call")


def explain_access(grants: GrantSet, table: AuthzTable, *, caller: str, capability: str, action: str, agent: str,
                   principal: str) -> dict[str, Any]:
    """Both gates for one target agent: allowed only when both let the call through."""
    gate = grant_gate(grants, caller, capability, agent)
    req = AuthzRequest(caller=caller, capability=capability, action=action, agent=agent, principal=principal)
    mine = table.for_agent(agent) if not any(c in agent for c in _GLOB_CHARS) else table
    d = mine.decide(req)
    return {"agent": agent, "allowed": gate.granted and d.allowed, "grant": gate.to_json(),
            "authz": {"allowed": d.allowed, "rule": d.rule, "reason": d.reason},
            "rule": d.rule, "reason": d.reason, "would_deny": d.would_deny, "rules": mine.explain(req)}
