"""Policies in the data plane: the registry of policy kinds, and `PolicyCache`, which keeps every kind compiled.

A policy is a JSON document stored at `/hivemesh/policies/<kind>/<name>`:

    {"kind": "retries", "name": "default", "description": "...", "spec": {...}}

Its version is the key's etcd mod revision. The control plane (`hivemesh.controlplane.policies`) validates and
writes documents; every node mirrors the prefix with a `PolicyCache` and reads only the compiled, immutable
structures it swaps in on each watch event, so the call path never touches etcd.

Declaring a kind (the stable API; the traffic kinds in `hivemesh.mesh.resilience.kinds` and the zero-trust
`authz` kind use it):

    from hivemesh.mesh.policy import PolicyDoc, PolicyError, PolicyKind

    def compile_authz(docs: Mapping[str, PolicyDoc]) -> AuthzTable:
        # docs: every valid stored document of the kind, by name. Pure and fast; return something immutable
        # (frozen dataclasses, tuples, MappingProxyType). compile({}) is the value in force with no document.
        # Raise PolicyError("spec.rules[0].from", "why") to refuse a combination of documents: the control
        # plane then refuses the apply, and a node keeps the last good value. Better, name the documents, each
        # mistake once: `found = Mistakes(); found.add(path, why, document=doc.name); found.raise_any()`, so
        # the store can say which document of an apply each path is in.
        ...

    AUTHZ: PolicyKind[AuthzTable] = PolicyKind(
        name="authz",                       # the <kind> in the key; [a-z][a-z0-9-]{0,30}
        spec_schema={...},                  # JSON Schema of "spec"; errors name the field: spec.rules[0].from
        compile=compile_authz,
        check=None,                         # optional: per-document checks beyond the schema; raise PolicyError,
                                            # one naming every mistake (collect them with `Mistakes`)
        check_any_spec=False,               # True: check copes with a spec the schema refused (see the field)
        description="who may call which capability",
    )

    # on the call path (any node): the compiled value, an O(1) read
    table = node.policies.get(AUTHZ)

Nothing is found by importing modules by name: whoever consumes a kind lists it. A node gives its cache the
kinds its layers read (`PolicyCache(endpoints, kinds=[*TRAFFIC_KINDS, AUTHZ])`); the control plane's store
validates the kinds it lists in `hivemesh.controlplane.policies.KINDS`, so a new kind is added there too.
Two different kinds under one name in one `PolicyKinds` are a ValueError.

Unknown kinds under the prefix (for example `grants`, which only the control plane reads) are ignored by nodes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

import fastjsonschema

from hivemesh.mesh import json_depth
from hivemesh.mesh.etcd import PREFIX, Endpoints
from hivemesh.mesh.watch import PrefixCache, WatchOptions

log = logging.getLogger(__name__)

C = TypeVar("C")

POLICIES_PREFIX: Final = PREFIX + "policies/"
GRANTS_PREFIX: Final = PREFIX + "grants/"
"""The `grants` kind lives outside POLICIES_PREFIX: every node reads the policies, only the control plane reads
grants, and etcd roles are key ranges (mesh/etcd_roles.py)."""
KIND_RE: Final = re.compile(r"[a-z][a-z0-9-]{0,30}")
NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


MAX_MISTAKES: Final = 50
"""The mistakes listed of one document at most: a list of 100,000 bad items is not worth 100,000 lines."""


class PolicyError(ValueError):
    """A policy document is not acceptable; `violations` maps each bad field's path to why.

    Paths are dotted from the document root, with list indexes: `spec.split[1].weight`. A compiler's refusal of a
    set of documents may also say which document each path is in: `documents` maps each document's name to its
    violations (`violations` are then the first document's), so a store can place them in the apply.
    """

    def __init__(self, path: str, message: str, *, more: Mapping[str, str] | None = None) -> None:
        self.violations: dict[str, str] = {path: message, **(more or {})}
        self.documents: Mapping[str, Mapping[str, str]] = MappingProxyType({})
        super().__init__(f"{path}: {message}" if path else message)

    @property
    def path(self) -> str:
        return next(iter(self.violations))

    @property
    def reason(self) -> str:
        return next(iter(self.violations.values()))

    def prefixed(self, prefix: str) -> PolicyError:
        """The same error with every path under prefix (e.g. `documents[2]`)."""
        items = [(f"{prefix}.{p}" if p else prefix, m) for p, m in self.violations.items()]
        first, rest = items[0], dict(items[1:])
        return PolicyError(first[0], first[1], more=rest)


class Mistakes:
    """Every mistake a check (or a compiler) finds, raised together as one PolicyError: a check that stopped at
    its first finding took one apply per mistake to learn them all. At most `limit` are kept; past it, `spec`
    says there were more. A second finding on one field is added to the first (`; `)."""

    def __init__(self, limit: int = MAX_MISTAKES) -> None:
        self._limit = limit
        self._found: dict[str, dict[str, str]] = {}
        self._count = 0
        self._past = False

    def add(self, path: str, message: str, *, document: str = "") -> None:
        """A mistake at path of the document being checked, or (a compiler's finding) of the document named."""
        if self._count >= self._limit:
            self._past = True
            return
        found = self._found.setdefault(document, {})
        said = found.get(path)
        if said is not None and message in said.split("; "):
            return
        found[path] = f"{said}; {message}" if said is not None else message
        self._count += 1

    def __bool__(self) -> bool:
        return self._count > 0

    def raise_any(self) -> None:
        """Raise one PolicyError naming every mistake found (with `documents` when they were named); return if
        there is none."""
        if not self._count:
            return
        first = next(iter(self._found.values()))
        if self._past:
            first.setdefault("spec", f"has more mistakes than the {self._limit} listed")
        (path, message), *rest = first.items()
        err = PolicyError(path, message, more=dict(rest))
        if any(self._found):
            err.documents = MappingProxyType({d: MappingProxyType(dict(v)) for d, v in self._found.items()})
        raise err


@dataclass(frozen=True)
class PolicyDoc:
    """One validated policy document. `spec` is plain JSON data; treat it as immutable."""

    kind: str
    name: str
    spec: Mapping[str, Any]
    description: str = ""
    version: int = 0
    """The etcd mod revision it was stored at (0 for a document not read from etcd)."""

    @property
    def key(self) -> str:
        return policy_key(self.kind, self.name)

    def to_json(self) -> dict[str, Any]:
        """The stored (envelope) form, without the version (etcd holds that)."""
        out: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.description:
            out["description"] = self.description
        out["spec"] = dict(self.spec)
        return out


@dataclass(frozen=True, eq=False)
class PolicyKind(Generic[C]):
    """A kind of policy: what its `spec` may contain and how a set of documents compiles for the call path."""

    name: str
    spec_schema: Mapping[str, Any]
    compile: Callable[[Mapping[str, PolicyDoc]], C]
    check: Callable[[PolicyDoc], None] | None = None
    description: str = ""
    check_any_spec: bool = False
    """True when check copes with any JSON spec (it judges only the parts that are well formed and raises nothing
    but PolicyError), so the store runs it even when the schema refused the spec and lists both findings at once;
    False: it runs only once the schema holds (it may index fields the schema guarantees)."""
    encode: Callable[[PolicyDoc], bytes] | None = None
    """How a document is stored; default the JSON envelope. (The `grants` kind keeps its older flat form.)"""
    decode: Callable[[str, bytes], PolicyDoc] | None = None
    """The inverse of encode, given the document's name; default: parse the JSON envelope."""

    def __post_init__(self) -> None:
        if not KIND_RE.fullmatch(self.name):
            raise ValueError(f"policy kind name {self.name!r} must match {KIND_RE.pattern}")

    @cached_property
    def validator(self) -> Callable[[Any], Any]:
        """The spec's compiled JSON Schema, compiled on first use: compiling every kind's schema when the module
        loads cost each hivemesh process (every CLI command, sidecar, agent) about a tenth of its start-up CPU,
        and most use few kinds or none. ValueError if the schema itself is invalid."""
        try:
            return fastjsonschema.compile(dict(self.spec_schema))
        except fastjsonschema.JsonSchemaDefinitionException as exc:
            raise ValueError(f"policy kind {self.name!r}: invalid spec schema: {exc}") from exc

    def validate(self, doc: PolicyDoc) -> PolicyDoc:
        """Schema then semantic checks of one document; raises PolicyError naming the field (the schema's first
        mistake, or every mistake the checks found). The store lists every mistake (`controlplane.policies`)."""
        try:
            self.validator(doc.spec)
        except fastjsonschema.JsonSchemaValueException as exc:
            path, message = schema_violation(exc, root="spec")
            raise PolicyError(path, message) from None
        if self.check is not None:
            self.check(doc)
        return doc

    def store(self, doc: PolicyDoc) -> bytes:
        if self.encode is not None:
            return self.encode(doc)
        return json.dumps(doc.to_json(), sort_keys=True, separators=(",", ":")).encode()

    def load(self, name: str, value: bytes, version: int = 0) -> PolicyDoc:
        """A stored document, validated (PolicyError if it is not acceptable)."""
        if self.decode is not None:
            doc = self.decode(name, value)
        else:
            try:
                raw = json_depth.loads(value)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise PolicyError("", f"stored value is not JSON: {exc}") from None
            if not isinstance(raw, dict) or not isinstance(raw.get("spec"), dict):
                raise PolicyError("spec", "stored document has no 'spec' object")
            doc = PolicyDoc(self.name, name, raw["spec"], str(raw.get("description", "")))
        if version:
            doc = PolicyDoc(doc.kind, doc.name, doc.spec, doc.description, version)
        return self.validate(doc)

    def empty(self) -> C:
        """The compiled value in force when no document of this kind exists."""
        return self.compile(MappingProxyType({}))


# --- a consumer's set of kinds ---------------------------------------------------------------------------------
class PolicyKinds(Mapping[str, PolicyKind[Any]]):
    """The kinds one consumer knows, by name (immutable): what a node's cache compiles, what the store accepts."""

    def __init__(self, kinds: Iterable[PolicyKind[Any]] = ()) -> None:
        by_name: dict[str, PolicyKind[Any]] = {}
        for kind in kinds:
            if by_name.setdefault(kind.name, kind) is not kind:
                raise ValueError(f"two different policy kinds are called {kind.name!r}")
        self._by_name: Mapping[str, PolicyKind[Any]] = MappingProxyType(by_name)

    def __getitem__(self, name: str) -> PolicyKind[Any]:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"PolicyKinds({', '.join(self._by_name)})"

    def get_kind(self, name: str) -> PolicyKind[Any]:
        """The kind called name; PolicyError (path `kind`) naming the known kinds if there is none."""
        kind = self._by_name.get(name)
        if kind is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            shown = repr(name[:64]) + ("..." if len(name) > 64 else "")  # the caller's text: echoed bounded
            raise PolicyError("kind", f"unknown policy kind {shown} (known: {known})")
        return kind

    def including(self, *kinds: PolicyKind[Any]) -> PolicyKinds:
        """These kinds and more."""
        return PolicyKinds((*self._by_name.values(), *kinds))


def kind_prefix(kind: str) -> str:
    """The key prefix of every document of kind."""
    return GRANTS_PREFIX if kind == "grants" else f"{POLICIES_PREFIX}{kind}/"


def policy_key(kind: str, name: str) -> str:
    return f"{kind_prefix(kind)}{name}"


def split_key(key: str) -> tuple[str, str] | None:
    """(kind, name) of a policy key, or None when key is not one."""
    if key.startswith(GRANTS_PREFIX):
        name = key[len(GRANTS_PREFIX):]
        return ("grants", name) if name and "/" not in name else None
    if not key.startswith(POLICIES_PREFIX):
        return None
    kind, sep, name = key[len(POLICIES_PREFIX):].partition("/")
    if not sep or not kind or not name or "/" in name:
        return None
    return kind, name


# --- schema errors with field paths ----------------------------------------------------------------------------
def _fmt_path(root: str, parts: Sequence[Any]) -> str:
    out = root
    for p in parts:
        s = str(p)
        out = f"{out}[{s}]" if s.isdigit() else (f"{out}.{s}" if out else s)
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "null" if value is None else type(value).__name__


def schema_violation(exc: fastjsonschema.JsonSchemaValueException, *, root: str = "") -> tuple[str, str]:
    """(field path, message) for a fastjsonschema failure, e.g. ("spec.attempts", "must be <= 10")."""
    parts = list(exc.path or [])[1:]  # drop fastjsonschema's leading "data"
    rule, defn, value = exc.rule, exc.rule_definition, exc.value
    definition = exc.definition if isinstance(exc.definition, dict) else {}
    if rule == "required" and isinstance(value, dict):
        missing = [f for f in (defn or []) if f not in value]
        if missing:
            return _fmt_path(root, [*parts, missing[0]]), "is required"
    if rule == "additionalProperties" and isinstance(value, dict):
        allowed = sorted(definition.get("properties", {}))
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            return _fmt_path(root, [*parts, unknown[0]]), f"unknown field{hint}"
    where = _fmt_path(root, parts) or root or "document"
    messages: dict[str, str] = {
        "maximum": f"must be <= {defn}",
        "minimum": f"must be >= {defn}",
        "exclusiveMaximum": f"must be < {defn}",
        "exclusiveMinimum": f"must be > {defn}",
        "minLength": f"must be at least {defn} characters long",
        "maxLength": f"must be at most {defn} characters long",
        "minItems": f"must have at least {defn} item(s)",
        "maxItems": f"must have at most {defn} item(s)",
        "minProperties": f"must have at least {defn} entr{'y' if defn == 1 else 'ies'}",
        "maxProperties": f"must have at most {defn} entries",
        "uniqueItems": "must not repeat items",
        "pattern": f"must match {defn}",
        "const": f"must be {json.dumps(defn)}",
    }
    if rule == "type":
        wanted = defn if isinstance(defn, str) else " or ".join(map(str, defn or []))
        article = "an" if str(wanted)[:1] in "aeio" else "a"
        return where, f"must be {article} {wanted}, not {_json_type(value)}"
    if rule == "enum":
        return where, f"must be one of: {', '.join(map(str, defn or []))} (got {value!r})"
    if rule in messages:
        return where, messages[rule]
    text = str(exc.message)
    name = str(exc.name or "data")
    text = text[len(name):].strip() if text.startswith(name) else text
    return where, text or "is not valid"


# --- the data-plane cache -------------------------------------------------------------------------------------------
class PolicyCache:
    """The policies of the given kinds under /hivemesh/policies/, compiled per kind and swapped atomically on
    each watch event (documents of other kinds are not this cache's to judge and are ignored).

    `get(kind)` / `compiled(name)` are O(1) reads of an immutable mapping replaced as a whole, so the call path
    sees one consistent view and never waits on etcd. A kind whose documents fail to compile keeps its last
    good value (the problem is logged and listed in `problems`); a document that fails validation is left out.
    While etcd is unreachable the last view stays in force.
    """

    def __init__(
        self,
        etcd_endpoints: Endpoints,
        *,
        kinds: Iterable[PolicyKind[Any]],
        on_change: Callable[[], None] | None = None,
        options: WatchOptions | None = None,
    ) -> None:
        self._kinds = PolicyKinds(kinds)
        self._on_change = on_change
        self._docs: dict[str, tuple[PolicyDoc, ...]] = {k: () for k in self._kinds}
        self._compiled: Mapping[str, Any] = MappingProxyType({k: kd.empty() for k, kd in self._kinds.items()})
        self._problems: dict[str, str] = {}
        self.compilations = 0
        self._cache: PrefixCache[PolicyDoc | None] = PrefixCache(
            etcd_endpoints, POLICIES_PREFIX, decode=self._decode, on_change=self._rebuild, options=options
        )

    # --- read side ----------------------------------------------------------------------------------------------
    def get(self, kind: PolicyKind[C]) -> C:
        """The compiled value of kind now (its empty value while no document exists)."""
        value: C = self._compiled[kind.name]
        return value

    def compiled(self, kind_name: str) -> Any:
        return self._compiled[kind_name]

    def view(self) -> Mapping[str, Any]:
        """kind name -> compiled value, one consistent immutable snapshot."""
        return self._compiled

    def docs(self, kind_name: str) -> tuple[PolicyDoc, ...]:
        """The valid documents of a kind in force now, sorted by name."""
        return self._docs.get(kind_name, ())

    @property
    def problems(self) -> Mapping[str, str]:
        """key or kind -> why it is not in force (invalid documents, failed compilations)."""
        return MappingProxyType(dict(self._problems))

    @property
    def revision(self) -> int:
        """The etcd revision the compiled view reflects."""
        return self._cache.revision

    @property
    def generation(self) -> int:
        return self._cache.generation

    @property
    def loaded(self) -> bool:
        return self._cache.loaded

    @property
    def watch(self) -> PrefixCache[PolicyDoc | None]:
        return self._cache

    async def wait_for_revision(self, revision: int, timeout: float) -> bool:
        """Wait until the view reflects etcd revision `revision` (e.g. the one an apply returned)."""
        return await self._cache.wait_for(lambda _snap: self._cache.revision >= revision, timeout)

    # --- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self, timeout: float = 10.0, *, wait: bool = True) -> None:
        """See PrefixCache.start."""
        await self._cache.start(timeout, wait=wait)

    async def stop(self) -> None:
        await self._cache.stop()

    async def __aenter__(self) -> PolicyCache:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- background -----------------------------------------------------------------------------------------
    def _decode(self, key: bytes, value: bytes) -> PolicyDoc | None:
        parts = split_key(key.decode("utf-8", "surrogateescape"))
        if parts is None or parts[0] not in self._kinds:
            return None  # another component's kind (e.g. grants): not ours to judge
        k = key.decode()
        try:
            doc = self._kinds[parts[0]].load(parts[1], value)
        except PolicyError as exc:
            self._problems[k] = str(exc)
            log.error("ignoring invalid policy %s: %s", k, exc)
            return None
        self._problems.pop(k, None)
        return doc

    def _rebuild(self) -> None:
        grouped: dict[str, list[PolicyDoc]] = {k: [] for k in self._kinds}
        snap = self._cache.snapshot()
        for doc in snap.values():
            if doc is not None:
                grouped[doc.kind].append(doc)
        for k in list(self._problems):
            if k.startswith(POLICIES_PREFIX) and k not in snap:
                self._problems.pop(k, None)  # the invalid document was deleted or replaced
        compiled = dict(self._compiled)
        changed = False
        for name, kind in self._kinds.items():
            docs = tuple(sorted(grouped[name], key=lambda d: d.name))
            if len(docs) == len(self._docs[name]) and all(a is b for a, b in zip(docs, self._docs[name], strict=True)):
                continue
            try:
                value = kind.compile(MappingProxyType({d.name: d for d in docs}))
            except Exception as exc:  # noqa: BLE001 - keep the last good value whatever the compiler raised
                self._problems[name] = f"not compiled, last good policy stays in force: {exc}"
                log.error("policy kind %s did not compile (%s); the last good policy stays in force", name, exc)
                continue
            self._problems.pop(name, None)
            self._docs[name] = docs
            compiled[name] = value
            changed = True
            self.compilations += 1
        if changed:
            self._compiled = MappingProxyType(compiled)
            if self._on_change is not None:
                try:
                    self._on_change()
                except Exception:
                    log.exception("on_change callback of the policy cache failed")
