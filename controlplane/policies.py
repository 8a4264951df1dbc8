"""The policy store: validate policy documents and keep them in etcd, all or nothing.

Documents (YAML or JSON; several per file with `---`, or a JSON list) look like

    kind: retries            # a registered kind (see below)
    name: default            # [a-z0-9][a-z0-9._-]{0,62}
    description: optional text
    version: 0               # optional compare-and-swap: the version you expect now (0: must not exist yet)
    spec: {...}              # checked against the kind's JSON Schema, then by its own checks and compiler

and are stored at `/hivemesh/policies/<kind>/<name>`; a document's version is its etcd mod revision. An apply is
one etcd transaction: every document is validated first, each affected kind is compiled with the documents it
would end up with (so conflicts between documents are refused too), and then all are written or none is.
Errors name the field: `retries/default: spec.attempts: must be <= 10`. A dry run does everything but write.

Kinds are declared next to what enforces them (`hivemesh.mesh.policy.PolicyKind`: the data plane needs the
same schemas and compilers) and this store accepts exactly the kinds listed in `KINDS` below; a node's cache
is given its own list. This module also declares `grants`, the control plane's older kind, which keeps its
flat stored form so `GrantSet` reads it unchanged; the data plane ignores it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import fastjsonschema
import jsonschema_rs

from hivemesh.controlplane import yaml_text
from hivemesh.controlplane.escalation_webhooks import ESCALATION_WEBHOOKS
from hivemesh.controlplane.grants import _GRANT_SCHEMA, Grant, GrantSet
from hivemesh.controlplane.shadow_check import refuse_unsafe_shadows
from hivemesh.controlplane.slo import SLOS
from hivemesh.controlplane.state_policy import STATE
from hivemesh.mesh import json_depth
from hivemesh.mesh.authz import AUTHZ
from hivemesh.mesh.budget import BUDGETS
from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError, NotFoundError
from hivemesh.mesh.policy import (
    MAX_MISTAKES,
    NAME_RE,
    PolicyDoc,
    PolicyError,
    PolicyKind,
    PolicyKinds,
    kind_prefix,
    policy_key,
    schema_violation,
)
from hivemesh.mesh.providers import PROVIDERS
from hivemesh.mesh.resilience.kinds import ROLLOUTS, TRAFFIC_KINDS

log = logging.getLogger(__name__)

MAX_DOCUMENTS: Final = 100  # etcd's default --max-txn-ops is 128
MAX_APPLY_BYTES: Final = 1024 * 1024
"""Stored bytes one apply may write: it is one etcd transaction, and etcd refuses a request past 1.5 MiB
(--max-request-bytes), which came back as the registry being unavailable, a status clients retry."""
_MAX_TEXT_BYTES: Final = 1 << 20
_ENVELOPE_FIELDS: Final = ("apiVersion", "kind", "name", "description", "version", "spec")
_API_VERSION: Final = "hivemesh/v1"
_TXN_ATTEMPTS: Final = 3


# --- the grants kind, kept in its flat form -----------------------------------------------------------------------
def _grant_spec_schema() -> dict[str, Any]:
    props = {k: v for k, v in _GRANT_SCHEMA["properties"].items() if k not in ("name", "description")}
    return {"type": "object", "required": ["subjects", "capabilities"], "additionalProperties": False,
            "properties": props}


def _encode_grant(doc: PolicyDoc) -> bytes:
    grant = Grant.from_doc({"name": doc.name, "description": doc.description, **doc.spec})
    return json.dumps(grant.to_doc(), sort_keys=True).encode("utf-8")


def _decode_grant(name: str, value: bytes) -> PolicyDoc:
    try:
        raw = json_depth.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PolicyError("", f"stored grant is not JSON: {exc!r}") from None
    if not isinstance(raw, dict):
        raise PolicyError("", "stored grant is not a JSON object")
    spec = {k: v for k, v in raw.items() if k not in ("name", "description")}
    return PolicyDoc("grants", name, spec, str(raw.get("description", "")))


def _compile_grants(docs: Mapping[str, PolicyDoc]) -> GrantSet:
    return GrantSet(Grant.from_doc({"name": d.name, "description": d.description, **d.spec}) for d in docs.values())


GRANTS_KIND: Final = PolicyKind(
    name="grants",
    spec_schema=_grant_spec_schema(),
    compile=_compile_grants,
    description="which capabilities an identity may be issued tokens for (read by the control plane)",
    encode=_encode_grant,
    decode=_decode_grant,
)

KINDS: Final = PolicyKinds((*TRAFFIC_KINDS, AUTHZ, BUDGETS, PROVIDERS, GRANTS_KIND, SLOS, STATE, ROLLOUTS,
                           ESCALATION_WEBHOOKS))
"""Every kind this store validates and keeps (add a new kind here and to the nodes that enforce it; `slos` is
read by `hivemesh slo rules` only, so no node mirrors it)."""


# --- documents ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyInput:
    """One document to apply: the validated policy plus the version the caller expects (None: any)."""

    doc: PolicyDoc
    kind: PolicyKind[Any]
    """The kind doc was validated as (it stores and compiles it)."""
    expected_version: int | None = None


def _invalid(err: PolicyError) -> InvalidInputError:
    return InvalidInputError(str(err), field_violations=err.violations)


def parse_documents(text: str, *, source: str = "<policies>") -> list[Any]:
    """The raw documents in YAML/JSON text: a multi-document stream, or one list of documents."""
    if len(text.encode("utf-8", "surrogatepass")) > _MAX_TEXT_BYTES:
        raise InvalidInputError(f"{source}: larger than {_MAX_TEXT_BYTES} bytes")
    loaded = yaml_text.load_all(text, source)
    if len(loaded) == 1 and isinstance(loaded[0], list):
        loaded = loaded[0]
    if not loaded:
        raise InvalidInputError(f"{source}: no policy documents in it")
    return loaded


_MAX_SPEC_MISTAKES: Final = MAX_MISTAKES
"""A spec's mistakes listed at most: a list of 100,000 bad items is not worth 100,000 lines."""
_MAX_LISTED_VALUES: Final = 2000
"""The largest spec (in values) whose every mistake is listed. jsonschema_rs lists all of them before the first is
read (about 6 µs each): unbounded, one 8 MiB apply of bad list items held the control plane's loop for seconds.
Real documents hold tens to hundreds of values."""


def _values_over(data: Any, limit: int) -> bool:
    """Whether data (JSON) holds more than limit values, counted no further than that."""
    todo, seen = [data], 0
    while todo:
        seen += 1
        if seen > limit:
            return True
        item = todo.pop()
        if isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False


def _spec_mistakes(kind: PolicyKind[Any], spec: dict[str, Any]) -> dict[str, str]:
    """Every place spec breaks kind's schema, worded as the compiled validator words its one (`schema_violation`).

    The compiled validator (fastjsonschema, fast on the path every node reads policies on) stops at the first
    mistake, so a spec with three bad fields took three applies to learn them all. jsonschema_rs finds every one;
    each is handed to `schema_violation` as the compiled validator would have reported it, so a field reads the
    same whichever found it. The kinds' schemas use no combinators (anyOf, oneOf, ...), so each mistake belongs to
    one keyword of one subschema. Called once the compiled validator refused spec; {} if jsonschema_rs cannot check
    it (the caller has the first mistake)."""
    out: dict[str, str] = {}
    if _values_over(spec, _MAX_LISTED_VALUES):
        return {"spec": f"not checked past its first mistake: it holds more than {_MAX_LISTED_VALUES:,} values"}
    try:
        for e in jsonschema_rs.Draft7Validator(dict(kind.spec_schema)).iter_errors(spec):
            steps, said = list(e.schema_path), e.message
            if "propertyNames" in steps:  # a key's own check: reported at its mapping, worded as fastjsonschema does
                steps, said = steps[:steps.index("propertyNames") + 1], "must be named by propertyName definition"
            definition: Any = kind.spec_schema
            for step in steps[:-1]:
                definition = definition[step]
            rule, value = str(steps[-1]), e.instance
            cases: list[tuple[Any, Any]]
            name = "data" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.instance_path)
            if rule == "required":
                definition = {**definition, "required": [e.kind.as_dict().get("property")]}
            if rule == "additionalProperties" and isinstance(value, dict):
                unexpected = [k for k in e.kind.as_dict().get("unexpected", []) if k in value]
                cases = [(definition, {k: value[k]}) for k in unexpected] or [(definition, value)]
            else:
                cases = [(definition, value)]
            for defn, val in cases:
                exc = fastjsonschema.JsonSchemaValueException(f"{name} {said}", val, name, defn, rule)
                path, message = schema_violation(exc, root="spec")
                out.setdefault(path, message)
                if len(out) > _MAX_SPEC_MISTAKES:
                    out = dict(list(out.items())[:_MAX_SPEC_MISTAKES])
                    out.setdefault("spec", f"has more mistakes than the {_MAX_SPEC_MISTAKES} listed")
                    return out
    except (ValueError, RecursionError, KeyError, IndexError, TypeError) as exc:  # no second opinion, not a crash
        log.debug("listing every mistake of a %s spec failed: %r", kind.name, exc)
    return out


def _within(path: str, field: str) -> bool:
    """Whether path is field or a part of it (`spec.a[0].b` is within `spec.a`)."""
    return path == field or path.startswith((f"{field}.", f"{field}["))


def _doc_mistakes(kind: PolicyKind[Any], doc: PolicyDoc) -> dict[str, str]:
    """Every mistake of doc's spec, at most _MAX_SPEC_MISTAKES: the schema's (the compiled validator's first one
    first, then the rest: `_spec_mistakes`) and its kind's own checks'.

    The checks run even when the schema refused the spec, where that is safe: the kind says its check copes with
    any spec (`check_any_spec`), and the spec is small enough to list (`_MAX_LISTED_VALUES`: some checks compare
    list items pairwise). Otherwise, a spec with a wrong number and a never-retried code took two applies to
    learn both. A check's finding within a field the schema refused is left out: that value is wrong already,
    and what a check made of it would only mislead."""
    schema: dict[str, str] = {}
    try:
        kind.validator(doc.spec)
    except fastjsonschema.JsonSchemaValueException as exc:
        path, message = schema_violation(exc, root="spec")
        schema[path] = message
        for p, m in _spec_mistakes(kind, dict(doc.spec)).items():
            schema.setdefault(p, m)
    if kind.check is None or (schema and (not kind.check_any_spec or _values_over(doc.spec, _MAX_LISTED_VALUES))):
        return schema
    checks: Mapping[str, str] = {}
    try:
        kind.check(doc)
    except PolicyError as err:
        checks = err.violations
    except Exception as exc:  # a check that did not cope with a refused spec: it adds nothing to it
        if not schema:
            raise
        log.warning("the %s check failed on a spec its schema refused (its findings are left out): %r", kind.name,
                    exc)
    out = dict(schema)
    for p, m in checks.items():
        if not any(_within(p, field) for field in schema):
            out.setdefault(p, m)
    if len(out) > _MAX_SPEC_MISTAKES:
        out = dict(list(out.items())[:_MAX_SPEC_MISTAKES])
        out.setdefault("spec", f"has more mistakes than the {_MAX_SPEC_MISTAKES} listed")
    return out


def validate_document(raw: Any, *, kinds: PolicyKinds = KINDS) -> PolicyInput:
    """One raw document (a mapping) as a validated policy of one of kinds; PolicyError names every bad field at
    once: of the envelope (kind, name, version, ...), of the spec's schema and of its kind's checks
    (`_doc_mistakes`), the first one first."""
    if not isinstance(raw, dict):
        raise PolicyError("", "a policy document must be a mapping with kind, name and spec")
    bad: dict[str, str] = {}
    for unknown in sorted(str(k) for k in raw if k not in _ENVELOPE_FIELDS):
        bad[unknown] = f"unknown field (allowed: {', '.join(_ENVELOPE_FIELDS)})"
    if raw.get("apiVersion", _API_VERSION) != _API_VERSION:
        bad["apiVersion"] = f"must be {_API_VERSION!r}"
    for required in ("kind", "name", "spec"):
        if required not in raw:
            bad[required] = "is required"
    kind: PolicyKind[Any] | None = None
    kind_name, name = raw.get("kind"), raw.get("name")
    if "kind" in raw:
        if not isinstance(kind_name, str):
            bad["kind"] = "must be a string"
        else:
            try:
                kind = kinds.get_kind(kind_name)
            except PolicyError as err:
                bad.update(err.violations)
    if "name" in raw and (not isinstance(name, str) or not NAME_RE.fullmatch(name)):
        bad["name"] = "must be a string matching [a-z0-9][a-z0-9._-]{0,62}"
    description = raw.get("description", "")
    if not isinstance(description, str) or len(description) > 1024:
        bad["description"] = "must be a string of at most 1024 characters"
    version = raw.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
        bad["version"] = "must be an integer >= 0 (the version you expect; 0: must not exist yet)"
    spec = raw.get("spec")
    if "spec" in raw and not isinstance(spec, dict):
        bad["spec"] = "must be a mapping"
    elif isinstance(spec, dict):
        # A JSON round trip keeps only JSON data (YAML dates and the like become errors here, not in etcd), and
        # no NaN or infinity (YAML's .nan, or NaN in spec_json): stored, they printed as `NaN`, which is not JSON,
        # and made alerts that could never fire and retry pauses that never end.
        try:
            spec = json_depth.loads(json.dumps(spec, allow_nan=False))
        except (TypeError, ValueError) as exc:
            bad["spec"] = f"must be JSON data: {exc}"
    doc: PolicyDoc | None = None
    if kind is not None and isinstance(spec, dict) and "spec" not in bad:
        # Checked even when the envelope is wrong, so one apply names the spec's mistakes too.
        checked = PolicyDoc(kind.name, name if isinstance(name, str) else "", spec,
                            description if isinstance(description, str) else "")
        mistakes = _doc_mistakes(kind, checked)
        for path, message in mistakes.items():
            bad.setdefault(path, message)
        doc = None if mistakes else checked
    if bad or kind is None or doc is None:
        (path, message), *rest = bad.items()
        raise PolicyError(path, message, more=dict(rest))
    return PolicyInput(doc, kind, version)


def validate_documents(raws: Sequence[Any], *, kinds: PolicyKinds = KINDS) -> list[PolicyInput]:
    """Every document validated, or one InvalidInputError that lists the mistakes of every bad document (paths
    under documents[i] when there are several); the same kind/name twice is refused, named by its first.

    Documents are numbered as their paths are, from 0, in the message too (`documents[1] (timeouts/a): name:
    timeouts/a is also documents[0]`): the path form is what the docs give and what a program reads, and a
    message counting from 1 beside paths counting from 0 read as a document clashing with itself."""
    if len(raws) > MAX_DOCUMENTS:
        raise InvalidInputError(f"at most {MAX_DOCUMENTS} documents can be applied at once, got {len(raws)}")
    many = len(raws) > 1
    out: list[PolicyInput] = []
    seen: dict[tuple[str, str], int] = {}
    violations: dict[str, str] = {}
    first = ""
    for i, raw in enumerate(raws):
        found: dict[str, str] = {}
        try:
            item = validate_document(raw, kinds=kinds)
        except PolicyError as err:
            found.update(err.violations)
        key = _key(raw)
        if key is not None and key in seen:  # a mistake whatever else is wrong with either document
            found.setdefault("name", f"{key[0]}/{key[1]} is also documents[{seen[key]}]")
        elif key is not None:
            seen[key] = i
        if found:
            (path, message), *rest = found.items()
            refusal = PolicyError(path, message, more=dict(rest))
            violations.update((refusal.prefixed(f"documents[{i}]") if many else refusal).violations)
            label = _label(raw, i if many else None)
            first = first or (f"{label}: {refusal}" if label else str(refusal))
            continue
        out.append(item)
    if violations:
        raise InvalidInputError(_headline(first, len(violations)), field_violations=violations)
    return out


def _headline(first: str, count: int) -> str:
    more = count - 1
    return f"{first}; and {more} more mistake{'s' if more > 1 else ''}" if more else first


def _key(raw: Any) -> tuple[str, str] | None:
    if isinstance(raw, dict) and isinstance(raw.get("kind"), str) and isinstance(raw.get("name"), str):
        return raw["kind"], raw["name"]
    return None


def _label(raw: Any, index: int | None) -> str:
    """How a message names a document: `documents[1] (retries/a)`, numbered as its paths are."""
    prefix = f"documents[{index}]" if index is not None else ""
    key = _key(raw)
    if key is not None:
        ident = f"{key[0]}/{key[1]}"
        return f"{prefix} ({ident})" if prefix else ident
    return prefix


def _compile_refusal(kind_name: str, err: PolicyError, items: Sequence[PolicyInput]
                     ) -> list[tuple[str, str, str]]:
    """(path in the apply, why, label of its document) for each mistake of a kind's compiler refusal, in the
    order of the apply's documents: under documents[i] when the compiler named the document (a clash names
    each side that is applied); as it gave them otherwise (an older compiler, or stored documents only)."""
    many = len(items) > 1
    index = {it.doc.name: i for i, it in enumerate(items) if it.doc.kind == kind_name}
    out: list[tuple[str, str, str]] = []
    for name in sorted((n for n in err.documents if n in index), key=index.__getitem__):
        i = index[name]
        label = _label({"kind": kind_name, "name": name}, i if many else None)
        out.extend((f"documents[{i}].{path}" if many else path, why, label)
                   for path, why in err.documents[name].items())
    return out or [(path, why, kind_name) for path, why in err.violations.items()]


# --- the store ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Applied:
    """What an apply did (or, in a dry run, would do) with one document."""

    kind: str
    name: str
    action: str
    """"created", "updated" or "unchanged"."""
    version: int
    """The version now (for a dry run: the current version, 0 if it would be created)."""


@dataclass(frozen=True)
class ApplyResult:
    applied: tuple[Applied, ...]
    revision: int
    """The etcd revision of the write (0 when nothing was written)."""
    dry_run: bool


async def _read_kind(etcd: Any, kind: PolicyKind[Any]) -> dict[str, tuple[PolicyDoc | None, int, bytes]]:
    """name -> (document or None if the stored one is invalid, mod revision, stored bytes)."""
    prefix = kind_prefix(kind.name).encode()
    out: dict[str, tuple[PolicyDoc | None, int, bytes]] = {}
    for kv in await etcd.get_prefix(prefix):
        name = kv.key[len(prefix):].decode("utf-8", "replace")
        try:
            doc: PolicyDoc | None = kind.load(name, kv.value, int(kv.mod_revision))
        except PolicyError as exc:
            log.warning("stored policy %s/%s is invalid: %s", kind.name, name, exc)
            doc = None
        out[name] = (doc, int(kv.mod_revision), kv.value)
    return out


async def apply_policies(etcd: Any, items: Sequence[PolicyInput], *, dry_run: bool = False,
                         fence: Sequence[Any] = (), also: Sequence[Any] = ()) -> ApplyResult:
    """Store every document in one transaction, or none; see the module docstring. A control-plane duty passes
    its leadership term's `fence` (the write fails once another replica leads: FailedPreconditionError) and its
    own bookkeeping writes as `also` (in the same transaction)."""
    if not items:
        raise InvalidInputError("no policy documents to apply")
    await refuse_unsafe_shadows(etcd, [i.doc for i in items])
    many = len(items) > 1
    for _attempt in range(_TXN_ATTEMPTS):
        by_kind: dict[str, dict[str, tuple[PolicyDoc | None, int, bytes]]] = {}
        kind_of = {item.doc.kind: item.kind for item in items}
        for kind_name, kind in kind_of.items():
            by_kind[kind_name] = await _read_kind(etcd, kind)
        # Each affected kind must still compile with the documents it would hold afterwards; every kind's
        # refusal is listed at once, each mistake under the document it is in.
        refused: dict[str, str] = {}
        first = ""
        for kind_name, stored in by_kind.items():
            kind = kind_of[kind_name]
            after = {n: d for n, (d, _r, _v) in stored.items() if d is not None}
            after.update({i.doc.name: i.doc for i in items if i.doc.kind == kind_name})
            try:
                kind.compile(MappingProxyType(after))
            except PolicyError as err:
                for where, why, label in _compile_refusal(kind_name, err, items):
                    refused.setdefault(where, why)
                    path = where.split(".", 1)[1] if where.startswith("documents[") else where
                    first = first or (f"{label}: {path}: {why}" if path else f"{label}: {why}")
        if refused:
            raise InvalidInputError(_headline(first, len(refused)), field_violations=refused)
        ops: list[Any] = []
        compares: list[Any] = []
        plan: list[tuple[PolicyInput, str, int]] = []
        written, largest = 0, (0, "")
        for i, item in enumerate(items):
            doc, kind = item.doc, item.kind
            current = by_kind[doc.kind].get(doc.name)
            current_rev = current[1] if current else 0
            if item.expected_version is not None and item.expected_version != current_rev:
                where = f"documents[{i}].version" if many else "version"
                msg = (f"{doc.kind}/{doc.name} is at version {current_rev}, not {item.expected_version}"
                       if current_rev else f"{doc.kind}/{doc.name} does not exist (expected version "
                       f"{item.expected_version})") if item.expected_version else (
                       f"{doc.kind}/{doc.name} already exists (version {current_rev})")
                raise FailedPreconditionError(msg, field_violations={where: msg})
            value = kind.store(doc)
            key = doc.key.encode()
            if current is not None and current[2] == value:
                plan.append((item, "unchanged", current_rev))
                continue
            plan.append((item, "updated" if current else "created", current_rev))
            if current is None:
                compares.append(etcd.transactions.version(key) == 0)
            else:
                compares.append(etcd.transactions.mod(key) == current_rev)
            ops.append(etcd.transactions.put(key, value))
            written += len(value)
            if len(value) > largest[0]:
                largest = (len(value), f"{doc.kind}/{doc.name}")
        if written > MAX_APPLY_BYTES:
            raise InvalidInputError(
                f"the documents take {written:,} bytes stored, more than one apply can write ({MAX_APPLY_BYTES:,}; "
                f"the largest, {largest[1]}, {largest[0]:,}): apply fewer at once, or split the largest",
                metadata={"max_apply_bytes": str(MAX_APPLY_BYTES)})
        if dry_run or not ops:
            return ApplyResult(
                tuple(Applied(p.doc.kind, p.doc.name, action, rev) for p, action, rev in plan), 0, dry_run
            )
        ok, responses = await etcd.transaction(compare=[*compares, *fence], success=[*ops, *also], failure=[])
        if not ok:
            if fence and not (await etcd.transaction(compare=list(fence), success=[], failure=[]))[0]:
                raise FailedPreconditionError("this control-plane replica no longer leads: another one decides now")
            continue  # someone changed one of these documents since we read it: read, check and try again
        revision = int(responses[0].response_put.header.revision) if responses else 0
        applied = tuple(
            Applied(p.doc.kind, p.doc.name, action, rev if action == "unchanged" else revision)
            for p, action, rev in plan
        )
        log.info("applied %s at revision %d", ", ".join(f"{a.kind}/{a.name} ({a.action})" for a in applied),
                 revision)
        return ApplyResult(applied, revision, False)
    raise FailedPreconditionError("the policies changed concurrently several times while applying; try again")


async def apply_text(etcd: Any, text: str, *, dry_run: bool = False, source: str = "<policies>") -> ApplyResult:
    """Parse, validate and apply YAML/JSON text."""
    return await apply_policies(etcd, validate_documents(parse_documents(text, source=source)), dry_run=dry_run)


async def get_policy(etcd: Any, kind_name: str, name: str) -> PolicyDoc:
    """The stored document kind/name (NotFoundError if there is none)."""
    kind = _known_kind(kind_name)
    kv = await etcd.get(policy_key(kind.name, _stored_name(name)).encode())
    if kv is None:
        raise NotFoundError(f"no {kind.name} policy named {name!r}", metadata={"kind": kind.name, "name": name[:128]})
    try:
        return kind.load(name, kv.value, int(kv.mod_revision))
    except PolicyError as exc:
        raise FailedPreconditionError(f"stored policy {kind.name}/{name} is invalid: {exc}") from None


async def list_policies(etcd: Any, kind_name: str | None = None) -> list[PolicyDoc]:
    """Every valid stored document (of one kind, or of every registered kind), sorted by kind then name."""
    selected = [_known_kind(kind_name)] if kind_name else [KINDS[k] for k in sorted(KINDS)]
    out: list[PolicyDoc] = []
    for kind in selected:
        stored = await _read_kind(etcd, kind)
        out.extend(d for _n, (d, _r, _v) in sorted(stored.items()) if d is not None)
    return out


async def delete_policy(etcd: Any, kind_name: str, name: str, *, expected_version: int | None = None) -> int:
    """Delete kind/name (NotFoundError if absent; FailedPreconditionError if not at expected_version).

    Returns the etcd revision of the deletion.
    """
    kind = _known_kind(kind_name)
    key = policy_key(kind.name, _stored_name(name)).encode()
    compare = [etcd.transactions.version(key) > 0]
    if expected_version is not None:
        compare.append(etcd.transactions.mod(key) == expected_version)
    ok, responses = await etcd.transaction(
        compare=compare, success=[etcd.transactions.delete(key)], failure=[etcd.transactions.get(key)]
    )
    if ok:
        log.info("deleted policy %s/%s", kind.name, name)
        return int(responses[0].response_delete_range.header.revision)
    existing = responses[0][0] if responses and responses[0] else None
    if existing is None:
        raise NotFoundError(f"no {kind.name} policy named {name!r}", metadata={"kind": kind.name, "name": name[:128]})
    raise FailedPreconditionError(
        f"{kind.name}/{name} is at version {existing[1].mod_revision}, not {expected_version}"
    )


def _stored_name(name: str) -> str:
    """name, if a stored document can have it (a get or delete by any other name finds nothing): InvalidInputError
    naming the rule otherwise, the name not echoed (a 20,000-character one overflowed gRPC's metadata bound)."""
    if not NAME_RE.fullmatch(name):
        msg = "must match [a-z0-9][a-z0-9._-]{0,62}"
        raise InvalidInputError(f"policy name {msg}", field_violations={"name": msg})
    return name


def _known_kind(kind_name: str) -> PolicyKind[Any]:
    try:
        return KINDS.get_kind(kind_name)
    except PolicyError as err:
        raise _invalid(err) from None
