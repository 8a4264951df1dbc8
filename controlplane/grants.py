"""Grants: which capabilities an identity may be issued tokens for, on which audiences.

A grant matches subjects (caller SPIFFE ids) and audiences (agent SPIFFE ids) with fnmatch globs and names
the capabilities it allows (globs too). Without a matching grant nothing is allowed: default deny. Grants
are validated once (file or etcd document) and compiled to regular expressions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import fastjsonschema

from hivemesh.controlplane import yaml_text
from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import FailedPreconditionError, InvalidInputError
from hivemesh.mesh.globs import Globs, is_glob
from hivemesh.mesh.keyspace import GRANTS_FILE
from hivemesh.mesh.policy import GRANTS_PREFIX as POLICY_GRANTS_PREFIX

log = logging.getLogger(__name__)

GRANTS_PREFIX: Final = POLICY_GRANTS_PREFIX.encode()
"""Outside /hivemesh/policies/, which every node reads: only the control plane reads grants."""
GRANTS_FILE_KEY: Final = GRANTS_FILE.encode()
"""What the control plane's grants file (`--grants`) last wrote: `{"grants": {NAME: sha256 of the stored value}}`.
Outside GRANTS_PREFIX (no grant reader sees it); like the grants, only the control plane (etcd root) reads it."""
_MAX_TXN_OPS: Final = 128  # etcd's default --max-txn-ops
_SEED_ATTEMPTS: Final = 3
_NAME = "^[a-z0-9][a-z0-9._-]{0,62}$"
_GLOBS = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1, "maxLength": 512}}
_GRANT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "subjects", "capabilities"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": _NAME},
        "description": {"type": "string"},
        "subjects": _GLOBS,
        "audiences": _GLOBS,
        "capabilities": _GLOBS,
    },
}
_DOC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["grants"],
    "additionalProperties": False,
    "properties": {"grants": {"type": "array", "items": _GRANT_SCHEMA}},
}
_validate_doc = fastjsonschema.compile(_DOC_SCHEMA)
_validate_grant = fastjsonschema.compile(_GRANT_SCHEMA)

_FIELD_HELP: Final = {
    "grants": "must be a list of grants",
    "name": "must be a string matching [a-z0-9][a-z0-9._-]{0,62}",
    "description": "must be a string",
    "subjects": "must be a non-empty list of strings (SPIFFE id globs)",
    "audiences": "must be a non-empty list of strings (agent SPIFFE id globs)",
    "capabilities": "must be a list of strings (capability globs), at least one",
}


def _node(doc: Any, path: Sequence[str]) -> Any:
    node = doc
    for part in path:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _schema_error(exc: fastjsonschema.JsonSchemaValueException, doc: Any, root: str) -> InvalidInputError:
    """Turn a schema violation into a message that names the field, e.g. `grants[1].capabilities: ...`."""
    path = [str(p) for p in (exc.path or [])][1:]  # drop fastjsonschema's leading 'data'
    def fmt(parts: Sequence[str]) -> str:
        out = root
        for p in parts:
            out = f"{out}[{p}]" if p.isdigit() else (f"{out}.{p}" if out else p)
        return out or "document"
    if exc.rule == "required":
        try:
            present = set(_node(doc, path))
        except (KeyError, IndexError, TypeError, ValueError):
            present = set()
        missing = [f for f in (exc.rule_definition or []) if f not in present]
        where, msg = fmt(path), f"missing required field(s): {', '.join(missing)}"
    elif exc.rule == "additionalProperties":
        try:
            node = _node(doc, path)
            allowed = set(_GRANT_SCHEMA["properties"]) if path else {"grants"}
            unknown = sorted(str(k) for k in node if k not in allowed)
        except (KeyError, IndexError, TypeError, ValueError):
            unknown = []
        where, msg = fmt(path), f"unknown field(s): {', '.join(unknown)}"
    else:
        # Report list items at their list ("capabilities: must be a list of strings"), the useful level.
        field_path = path[:-1] if path and path[-1].isdigit() and len(path) > 1 else path
        last = next((p for p in reversed(field_path) if not p.isdigit()), "")
        where = fmt(field_path)
        msg = _FIELD_HELP.get(last, str(exc.message).removeprefix("data").strip(" ."))
    text = f"{where}: {msg}"
    return InvalidInputError(text, field_violations={where: msg})


@dataclass(frozen=True)
class Grant:
    name: str
    subjects: tuple[str, ...]
    audiences: tuple[str, ...] | None
    capabilities: tuple[str, ...]
    description: str = ""
    _subj: Globs = field(init=False, repr=False, compare=False)
    _aud: Globs | None = field(init=False, repr=False, compare=False)
    _caps: Globs = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Globs are compiled once; `allowed` runs per IssueToken.
        object.__setattr__(self, "_subj", Globs(self.subjects))
        object.__setattr__(self, "_aud", Globs(self.audiences) if self.audiences else None)
        object.__setattr__(self, "_caps", Globs(self.capabilities))

    def matches(self, subject: str, audience: str) -> bool:
        return self._subj.match(subject) and (self._aud is None or self._aud.match(audience))

    def names_subject(self, subject: str) -> bool:
        """Whether subject is one of this grant's subjects (on whichever audiences it names)."""
        return self._subj.match(subject)

    def allows(self, capability: str) -> bool:
        return self._caps.match(capability)

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "subjects": list(self.subjects)}
        if self.audiences is not None:
            doc["audiences"] = list(self.audiences)
        doc["capabilities"] = list(self.capabilities)
        if self.description:
            doc["description"] = self.description
        return doc

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Grant:
        """One grant from a validated document."""
        return cls(
            name=doc["name"],
            subjects=tuple(doc["subjects"]),
            audiences=tuple(doc["audiences"]) if "audiences" in doc else None,
            capabilities=tuple(doc["capabilities"]),
            description=doc.get("description", ""),
        )


class GrantSet:
    """An immutable set of grants; `allowed` answers what a subject may have on an audience."""

    def __init__(self, grants: Iterable[Grant] = ()) -> None:
        self.grants: tuple[Grant, ...] = tuple(grants)

    def __len__(self) -> int:
        return len(self.grants)

    @classmethod
    def from_doc(cls, doc: Any) -> GrantSet:
        """Validate a `{"grants": [...]}` document; InvalidInputError names the bad field."""
        try:
            _validate_doc(doc)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise _schema_error(exc, doc, "") from None
        seen: dict[str, int] = {}
        for i, g in enumerate(doc["grants"]):
            if g["name"] in seen:
                where = f"grants[{i}].name"
                msg = f"duplicate grant name {g['name']!r} (also grants[{seen[g['name']]}])"
                raise InvalidInputError(f"{where}: {msg}", field_violations={where: msg})
            seen[g["name"]] = i
        return cls(Grant.from_doc(g) for g in doc["grants"])

    def to_doc(self) -> dict[str, Any]:
        return {"grants": [g.to_doc() for g in self.grants]}

    def allowed(
        self,
        subject: str,
        audience: str,
        requested: Sequence[str],
        offered: Sequence[str] | None,
    ) -> list[str]:
        """The capabilities subject may be granted on audience, sorted.

        requested empty means "everything": all offered capabilities the grants allow. offered is what the
        audience agent serves; None means it is unknown (agent not registered), and then the requested
        capabilities, or with none requested, the literal (non-glob) capabilities of the matching grants,
        are judged by the grants alone. Default deny: no matching grant, nothing allowed.
        """
        matching = [g for g in self.grants if g.matches(subject, audience)]
        if not matching:
            return []
        if offered is None:
            candidates: Iterable[str] = requested or {
                c for g in matching for c in g.capabilities if not is_glob(c)
            }
        else:
            offered_set = set(offered)
            candidates = [c for c in requested if c in offered_set] if requested else offered_set
        return sorted({c for c in candidates if any(g.allows(c) for g in matching)})

    def matches_any(self, subject: str, audience: str) -> bool:
        """True when some grant names subject on audience, whatever capabilities it allows."""
        return any(g.matches(subject, audience) for g in self.grants)

    def may_ever(self, subject: str, capability: str) -> bool:
        """True when some grant, on any audience, allows subject the capability (a delegation ceiling)."""
        return any(g.names_subject(subject) and g.allows(capability) for g in self.grants)

    @classmethod
    async def from_etcd(cls, etcd: Any) -> GrantSet:
        """Every grant stored under /hivemesh/grants/; an invalid document is skipped (and logged),
        which can only narrow what is allowed (fail closed)."""
        grants: list[Grant] = []
        for kv in await etcd.get_prefix(GRANTS_PREFIX):
            try:
                doc = json_depth.loads(kv.value)
                _validate_grant(doc)
            except (ValueError, fastjsonschema.JsonSchemaValueException) as exc:
                log.warning("ignoring invalid grant at %s: %s", kv.key.decode(errors="replace"), exc)
                continue
            grants.append(Grant.from_doc(doc))
        return cls(grants)


def parse_grants_text(text: str, *, source: str = "<grants>") -> GrantSet:
    """Parse YAML (JSON is YAML) grant text and validate it."""
    doc = yaml_text.load(text, source)
    return GrantSet.from_doc(doc)


def load_grants(path: Path | str) -> GrantSet:
    """Load and validate a YAML or JSON grant file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"cannot read grant file {p}: {exc.strerror}") from None
    return parse_grants_text(text, source=str(p))


async def put_grants(etcd: Any, grantset_doc: GrantSet | Mapping[str, Any], *, replace: bool = False) -> int:
    """Write each grant to /hivemesh/grants/<name> in one transaction (all or nothing).

    With replace=True, grants not in the document are deleted in the same transaction, so the document
    becomes the whole grant set, including those `hivemesh allow` wrote: the control plane's grants file uses
    `seed_grants` instead. Returns the number of grants written.
    """
    gs = grantset_doc if isinstance(grantset_doc, GrantSet) else GrantSet.from_doc(grantset_doc)
    ops: list[Any] = []
    names = {g.name.encode() for g in gs.grants}
    if replace:
        existing = await etcd.get_prefix(GRANTS_PREFIX, keys_only=True)
        for kv in existing:
            if kv.key[len(GRANTS_PREFIX):] not in names:
                ops.append(etcd.transactions.delete(kv.key))
    for g in gs.grants:
        value = json.dumps(g.to_doc(), sort_keys=True).encode("utf-8")
        ops.append(etcd.transactions.put(GRANTS_PREFIX + g.name.encode(), value))
    if len(ops) > _MAX_TXN_OPS:
        raise InvalidInputError(
            f"too many grants to apply atomically ({len(ops)} operations; etcd allows {_MAX_TXN_OPS})"
        )
    if ops:
        await etcd.transaction(compare=[], success=ops, failure=[])
    return len(gs.grants)


@dataclass(frozen=True)
class SeedResult:
    """What `seed_grants` did, by grant name."""

    written: tuple[str, ...] = ()
    """Created, or updated to what the file says."""
    deleted: tuple[str, ...] = ()
    """Dropped from the file, and still as the file wrote them."""
    kept: tuple[str, ...] = ()
    """Dropped from the file but changed since the file wrote them: someone else's now, left in place."""
    taken: tuple[str, ...] = ()
    """Written (in written too) over a grant of that name the file had not written: the file's from now on."""
    unchanged: int = 0

    def summary(self) -> str:
        parts = [f"{len(self.written)} written", f"{self.unchanged} unchanged", f"{len(self.deleted)} deleted"]
        return ", ".join(parts) + "".join(f" ({what}: {', '.join(names)})" for what, names in (
            ("written", self.written), ("deleted", self.deleted)) if names)


def _digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


def _file_owned(kv: Any) -> dict[str, str]:
    """name -> digest of what the grants file wrote, from GRANTS_FILE_KEY's value; {} if there is none or it is
    unreadable (then nothing is deleted: a grant the file dropped stays until `hivemesh policy delete grants`)."""
    if kv is None:
        return {}
    try:
        owned = json_depth.loads(kv.value)["grants"]
        if isinstance(owned, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in owned.items()):
            return owned
    except (ValueError, KeyError, TypeError):
        pass
    log.warning("ignoring unreadable %s: no grant the grants file dropped is deleted this time",
                GRANTS_FILE_KEY.decode())
    return {}


async def seed_grants(etcd: Any, grants: GrantSet) -> SeedResult:
    """Make the store hold the grants file's grants, and leave every other grant alone (one transaction).

    The file owns the grants it names: each is created or overwritten to what the file says. Grants the file does
    not name were written by `hivemesh allow` or `hivemesh policy apply` and are not the file's to delete (the
    file used to replace the whole set, so every restart of `hivemesh up` removed what `allow` had added). The
    file's grants are recorded at GRANTS_FILE_KEY, so one the file stops naming is deleted, but only while it
    still holds what the file wrote: edited since, it is someone's own and stays (logged). Nothing changed, nothing
    is written: a second replica starting with the same file moves no revision. Compare-and-swap on every key it
    read, retried when another writer (a replica starting at the same time) got in between.
    """
    t = etcd.transactions
    for _attempt in range(_SEED_ATTEMPTS):
        marker = await etcd.get(GRANTS_FILE_KEY)
        owned = _file_owned(marker)
        stored = {kv.key[len(GRANTS_PREFIX):].decode("utf-8", "replace"): kv
                  for kv in await etcd.get_prefix(GRANTS_PREFIX)}
        compares: list[Any] = [t.mod(GRANTS_FILE_KEY) == int(marker.mod_revision) if marker is not None
                               else t.version(GRANTS_FILE_KEY) == 0]
        ops: list[Any] = []
        wanted: dict[str, str] = {}
        written: list[str] = []
        taken: list[str] = []
        deleted: list[str] = []
        kept: list[str] = []
        unchanged = 0
        for g in grants.grants:
            key = GRANTS_PREFIX + g.name.encode()
            value = json.dumps(g.to_doc(), sort_keys=True).encode("utf-8")
            wanted[g.name] = _digest(value)
            current = stored.get(g.name)
            if current is not None and current.value == value:
                unchanged += 1
                continue
            if current is not None and owned.get(g.name) != _digest(current.value):
                taken.append(g.name)
            compares.append(t.mod(key) == int(current.mod_revision) if current is not None else t.version(key) == 0)
            ops.append(t.put(key, value))
            written.append(g.name)
        for name, digest in sorted(owned.items()):
            current = stored.get(name)
            if name in wanted or current is None:
                continue
            if _digest(current.value) != digest:
                kept.append(name)
                continue
            key = GRANTS_PREFIX + name.encode()
            compares.append(t.mod(key) == int(current.mod_revision))
            ops.append(t.delete(key))
            deleted.append(name)
        if wanted != owned:
            ops.append(t.put(GRANTS_FILE_KEY, json.dumps({"grants": wanted}, sort_keys=True).encode("utf-8")))
        result = SeedResult(tuple(written), tuple(deleted), tuple(kept), tuple(taken), unchanged)
        if not ops:
            return result
        if max(len(ops), len(compares)) > _MAX_TXN_OPS:
            raise InvalidInputError(f"too many grant changes to apply atomically ({len(ops)} operations; etcd allows "
                                    f"{_MAX_TXN_OPS}): split the grants file's changes over several starts")
        ok, _responses = await etcd.transaction(compare=compares, success=ops, failure=[])
        if ok:
            return result
    raise FailedPreconditionError("the grants kept changing while the grants file was loaded; start again")
