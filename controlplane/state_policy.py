"""Who may read and write which shared-state namespace, and the bounds of each: the `state` policy kind.

A policy kind (not a grants-like file) because operators already apply, version, validate, list and audit
policies with one tool (`hivemesh policy apply`), and the control plane, which serves the State service, reads
them per request from the same store:

    kind: state
    name: research-team
    spec:
      namespaces: ["workflow/client-planner/*", "conversation/*"]   # fnmatch globs ("*" spans "/")
      read: ["spiffe://hivemesh.local/agent/*"]                      # may get, list and watch
      write: ["spiffe://hivemesh.local/agent/planner"]               # may also put and delete
      max_value_bytes: 65536          # one value's JSON (default 64 KiB, at most 512 KiB)
      max_namespace_bytes: 1048576    # all of a namespace's values together (default 1 MiB, at most 16 MiB)
      ttl_seconds: 86400              # an entry lives this long after its last write (default: until deleted)

Default deny: a namespace no policy names is closed to everyone but operators, who may read (never write) every
namespace. Several matching documents add up their readers and writers; the tightest stated bound applies.
Built in: a workload owns `memory/<kind>-<name>[/...]` (conversation memory, `hivemesh.sdk.memory`) without a
policy, with MEMORY_DEFAULTS; a policy naming such a namespace may add readers and tighten its bounds.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from hivemesh.mesh.errors import InvalidInputError
from hivemesh.mesh.pki import SpiffeId
from hivemesh.mesh.policy import Mistakes, PolicyDoc, PolicyKind

KIND_NAME: Final = "state"
NAMESPACE_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}(/[A-Za-z0-9][A-Za-z0-9._:@=+-]{0,127}){0,6}")
"""A scope word, then up to six segments: `workflow/client-app/r-1`, `conversation/c-42`."""
KEY_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@=+-]{0,199}")
"""Keys never hold "/" or "#": the store keeps `<namespace>#<key>`, so no namespace's keys fall in another's."""
KEY_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9._:@=+-]{0,200}")
MAX_VALUE_BYTES: Final = 512 * 1024
"""Hard bound of one value (etcd takes at most 1.5 MiB per request; state is for small documents). Stored as UTF-8
it takes at most twice this (escaped quotes and backslashes), under that limit."""
MAX_NAMESPACE_BYTES: Final = 16 * 1024 * 1024
"""Hard bound of a namespace's values together. The State service reads a namespace in pages (writes check usage,
lists count it), so no single etcd answer grows with it; one ListState answer carries at most 6 MiB of entries."""
MAX_TTL_S: Final = 365 * 86400
MEMORY_SCOPE: Final = "memory"


@dataclass(frozen=True)
class Bounds:
    """A namespace's size bounds and retention."""

    max_value_bytes: int = 64 * 1024
    max_namespace_bytes: int = 1024 * 1024
    ttl_s: int = 0
    """0: kept until deleted."""

    def tightened(self, spec: Mapping[str, Any], stated: set[str]) -> Bounds:
        """These bounds with spec's stated ones applied (the smaller wins once a bound was stated before)."""
        out = {"max_value_bytes": self.max_value_bytes, "max_namespace_bytes": self.max_namespace_bytes,
               "ttl_s": self.ttl_s}
        for field, key in (("max_value_bytes", "max_value_bytes"), ("max_namespace_bytes", "max_namespace_bytes"),
                           ("ttl_s", "ttl_seconds")):
            if key in spec:
                value = int(spec[key])
                out[field] = min(out[field], value) if field in stated else value
                stated.add(field)
        return Bounds(**out)


DEFAULTS: Final = Bounds()
MEMORY_DEFAULTS: Final = Bounds(max_value_bytes=64 * 1024, max_namespace_bytes=256 * 1024, ttl_s=30 * 86400)
"""Conversation memory: small, and forgotten 30 days after its last write unless a policy says otherwise."""


@dataclass(frozen=True)
class Access:
    """What one identity may do in one namespace, and the namespace's bounds."""

    read: bool
    write: bool
    bounds: Bounds


_GLOBS: Final[dict[str, Any]] = {"type": "array", "minItems": 1, "maxItems": 256,
                                 "items": {"type": "string", "minLength": 1, "maxLength": 512}}
SPEC_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["namespaces"],
    "additionalProperties": False,
    "properties": {
        "namespaces": _GLOBS,
        "read": _GLOBS,
        "write": _GLOBS,
        "max_value_bytes": {"type": "integer", "minimum": 1, "maximum": MAX_VALUE_BYTES},
        "max_namespace_bytes": {"type": "integer", "minimum": 1, "maximum": MAX_NAMESPACE_BYTES},
        "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": MAX_TTL_S},
    },
}


def _check(doc: PolicyDoc) -> None:
    """Checks beyond the schema; PolicyError names every mistake found (`Mistakes`), not only the first."""
    spec, found = doc.spec, Mistakes()
    if "read" not in spec and "write" not in spec and not any(
        k in spec for k in ("max_value_bytes", "max_namespace_bytes", "ttl_seconds")
    ):
        found.add("spec", "a state policy needs read, write, or a bound (max_*_bytes, ttl_seconds)")
    for i, glob in enumerate(spec["namespaces"]):
        head = glob.split("/", 1)[0]
        if not re.fullmatch(r"[a-z0-9*?][a-z0-9._*?-]{0,62}", head):
            found.add(f"spec.namespaces[{i}]", f"{glob!r} must start with a scope word ([a-z0-9._-])")
    mv, mn = spec.get("max_value_bytes"), spec.get("max_namespace_bytes")
    if mv is not None and mn is not None and mv > mn:
        found.add("spec.max_value_bytes", f"{mv} is more than max_namespace_bytes ({mn})")
    found.raise_any()


@dataclass(frozen=True)
class StateRules:
    """The compiled `state` documents: `access(subject, namespace)`."""

    docs: tuple[PolicyDoc, ...]

    def access(self, subject: SpiffeId, namespace: str) -> Access:
        sid = str(subject)
        owned = namespace_owner(namespace) == f"{subject.kind}-{subject.name}"
        read = write = owned
        bounds, stated = (MEMORY_DEFAULTS if namespace.startswith(MEMORY_SCOPE + "/") else DEFAULTS), set[str]()
        for doc in self.docs:
            spec = doc.spec
            if not any(fnmatch.fnmatchcase(namespace, g) for g in spec["namespaces"]):
                continue
            bounds = bounds.tightened(spec, stated)
            may_write = any(fnmatch.fnmatchcase(sid, g) for g in spec.get("write", ()))
            write = write or may_write
            read = read or may_write or any(fnmatch.fnmatchcase(sid, g) for g in spec.get("read", ()))
        if subject.kind == "operator":
            read = True
        return Access(read, write, bounds)


def _compile(docs: Mapping[str, PolicyDoc]) -> StateRules:
    return StateRules(tuple(docs[n] for n in sorted(docs)))


STATE: Final = PolicyKind(
    name=KIND_NAME,
    spec_schema=SPEC_SCHEMA,
    compile=_compile,
    check=_check,
    description="who may read and write which shared-state namespace, with its size bounds and retention",
)


def namespace_owner(namespace: str) -> str:
    """`<kind>-<name>` of a `memory/<kind>-<name>[/...]` namespace, else ""."""
    parts = namespace.split("/")
    return parts[1] if len(parts) > 1 and parts[0] == MEMORY_SCOPE else ""


def check_namespace(namespace: str) -> str:
    if not NAMESPACE_RE.fullmatch(namespace):
        msg = ("namespace must be a scope word ([a-z0-9][a-z0-9._-]{0,62}) and up to six /-separated segments "
               "([A-Za-z0-9][A-Za-z0-9._:@=+-]{0,127}), e.g. conversation/c-42")
        raise InvalidInputError(f"{msg}; got {namespace[:80]!r}", field_violations={"namespace": msg})
    return namespace


def check_key(key: str, *, field: str = "key") -> str:
    if not KEY_RE.fullmatch(key):
        msg = "key must match [A-Za-z0-9][A-Za-z0-9._:@=+-]{0,199} (no '/')"
        raise InvalidInputError(f"{msg}; got {key[:80]!r}", field_violations={field: msg})
    return key


def check_key_prefix(prefix: str) -> str:
    if not KEY_PREFIX_RE.fullmatch(prefix):
        msg = "key_prefix must match [A-Za-z0-9._:@=+-]{0,200}"
        raise InvalidInputError(f"{msg}; got {prefix[:80]!r}", field_violations={"key_prefix": msg})
    return prefix
