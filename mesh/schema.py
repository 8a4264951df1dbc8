"""Capability payload schemas: compiled once per capability, checked on every call, in the dialect they declare.

JSON Schema 2020-12 is the default dialect (what A2A and the OpenAI tool format use); a schema may declare
draft-04, -06, -07 or 2019-09 with `$schema` and is then read by that draft's rules. Any other `$schema` is
refused when the schema is compiled (an agent's card at registration, an SDK capability at import), so a
schema is never read by the wrong rules. The validator is jsonschema-rs: complete for every draft above and
the fastest measured on the call path (bench/schema_validators.py; figures in the README's "Dependencies").
Remote `$ref`s are never fetched: a schema must be self-contained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import jsonschema_rs

from hivemesh.mesh import json_depth

DEFAULT_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

_DIALECTS: Final[dict[str, tuple[str, Any]]] = {
    "json-schema.org/draft-04/schema": ("draft-04", jsonschema_rs.Draft4Validator),
    "json-schema.org/draft-06/schema": ("draft-06", jsonschema_rs.Draft6Validator),
    "json-schema.org/draft-07/schema": ("draft-07", jsonschema_rs.Draft7Validator),
    "json-schema.org/draft/2019-09/schema": ("2019-09", jsonschema_rs.Draft201909Validator),
    "json-schema.org/draft/2020-12/schema": ("2020-12", jsonschema_rs.Draft202012Validator),
}
"""Dialect URIs without scheme and empty fragment (people write http:// or https://, with or without '#')."""


class SchemaError(ValueError):
    """A schema that cannot be compiled: not JSON, an unknown `$schema`, or not valid in its dialect."""


MAX_VIOLATIONS: Final = 12
"""Bad fields a mismatch lists, the first included: as many as a status's details carry (`errors.MAX_DETAIL_ENTRIES`,
which keeps its trailers under gRPC's 16 KiB); the message says how many more there were."""
_MAX_JOINED: Final = 256
"""A field's description stops taking more of its errors past this length (a status carries 256 bytes of it)."""
SEARCHED_VALUES: Final = 1024
"""A failing value of at most this many JSON values (objects, arrays and scalars) is searched for every bad field;
a larger one names only the first. jsonschema-rs collects all of a value's errors at once, so a 4 MiB input of bad
items costs seconds where its first error costs microseconds: the search is bounded by the input, not its errors."""


class SchemaMismatchError(ValueError):
    """A value that does not match its schema: where (a field path such as `input.items[2].sku`) and why, for the
    first bad field (`path`, `message`) and for each one listed (`violations`, the first first, one entry a field).
    Its text names the first and says how many more there were."""

    def __init__(
        self, path: str, message: str, violations: dict[str, str] | None = None, *, unlisted: int = 0,
        searched: bool = True,
    ) -> None:
        self.path = path
        self.message = message
        self.violations: dict[str, str] = violations if violations else {path: message}
        """Each bad field listed (at most MAX_VIOLATIONS): its path and why."""
        self.more = len(self.violations) - 1 + unlisted
        """Bad fields besides the first, the unlisted included."""
        if self.more:
            fields = "field" if self.more == 1 else "fields"
            listed = "" if not unlisted else f"; the first {len(self.violations)} are listed"
            super().__init__(f"{path}: {message} (and {self.more} more bad {fields}{listed})")
        elif not searched:
            super().__init__(f"{path}: {message} (the first bad field: an input of over {SEARCHED_VALUES} JSON "
                             "values is not searched for more)")
        else:
            super().__init__(f"{path}: {message}")


def _dialect(uri: Any, where: str) -> tuple[str, Any]:
    if not isinstance(uri, str):
        raise SchemaError(f"{where}: $schema must be a URI string, not {type(uri).__name__}")
    key = uri.strip().removesuffix("#")
    for scheme in ("https://", "http://"):
        key = key.removeprefix(scheme)
    found = _DIALECTS.get(key)
    if found is None:
        known = ", ".join(f"https://{k}" for k in _DIALECTS)
        raise SchemaError(f"{where}: unsupported $schema {uri[:200]!r}: declare one of {known}")
    return found


def _path(parts: Any, root: str) -> str:
    out = [root]
    for part in parts:
        out.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(out)


def _first_line(message: str) -> str:
    return message.split("\n", 1)[0]


def _small(value: Any) -> bool:
    """value holds at most SEARCHED_VALUES JSON values (a walk that stops past the bound)."""
    left = SEARCHED_VALUES
    stack = [value]
    while stack:
        item = stack.pop()
        left -= 1
        if left < 0:
            return False
        if isinstance(item, dict | list):
            if len(item) > left:
                return False
            stack.extend(item.values() if isinstance(item, dict) else item)
    return True


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    """One compiled schema; `check` raises `SchemaMismatchError` listing the failing fields, the first first."""

    dialect: str
    """"2020-12", "draft-07", ...: the rules the schema is read by."""
    _validator: Any

    def check(self, value: Any, *, root: str = "input") -> None:
        """Raises SchemaMismatchError (paths under `root`) on a mismatch, and SchemaMismatchError at `root` for a value
        with no JSON form (a lone surrogate) or nested too deeply to validate.

        A valid value costs one validation, as before; only a failing one is searched again for its other bad
        fields (`_mismatch`)."""
        try:
            self._validator.validate(value)
        except jsonschema_rs.ValidationError as exc:
            raise self._mismatch(value, exc, root) from None
        except RecursionError:
            raise SchemaMismatchError(root, "nested too deeply to validate") from None
        except ValueError as exc:  # jsonschema-rs's recursion limit, or a string that is not valid Unicode
            text = str(exc)
            why = "nested too deeply to validate" if "ecursion" in text else f"not valid JSON data: {text}"
            raise SchemaMismatchError(root, why) from None

    def _mismatch(self, value: Any, first: jsonschema_rs.ValidationError, root: str) -> SchemaMismatchError:
        """The mismatch of a failing value: `first` (validate's error) and, for a value no larger than
        SEARCHED_VALUES, every other bad field (MAX_VIOLATIONS listed). One entry a field: the errors at one path
        share it, joined with "; " (two missing required properties are two errors at their object's path)."""
        path, message = _path(first.instance_path, root), _first_line(first.message)
        if not _small(value):
            return SchemaMismatchError(path, message, searched=False)
        violations = {path: message}
        unlisted: set[str] = set()
        try:
            errors = self._validator.iter_errors(value)
            for error in errors:
                where = _path(error.instance_path, root)
                why = _first_line(error.message)
                known = violations.get(where)
                if known is not None:
                    if why not in known and len(known) < _MAX_JOINED:
                        violations[where] = f"{known}; {why}"
                elif len(violations) < MAX_VIOLATIONS:
                    violations[where] = why
                else:
                    unlisted.add(where)
        except (RecursionError, ValueError):  # validate read it, so not expected: the first is still right
            pass
        return SchemaMismatchError(path, message, violations, unlisted=len(unlisted))


def compile_schema(schema_text: str, *, where: str) -> CompiledSchema | None:
    """Compile a schema (JSON text) once; None for an empty one (any JSON).

    Raises:
        SchemaError: naming `where`, for text that is not a JSON Schema object, an unsupported `$schema`, or a
            schema invalid in its dialect (say, `items` given as an array under 2020-12).
    """
    if not schema_text:
        return None
    try:
        schema = json_depth.loads(schema_text)
    except ValueError as exc:
        raise SchemaError(f"{where}: the schema is not JSON: {exc}") from None
    except RecursionError:  # json reads nesting recursively; jsonschema_rs has its own limit below that
        raise SchemaError(f"{where}: the schema is nested too deeply") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: a JSON Schema is an object, not {type(schema).__name__}")
    dialect, cls = _dialect(schema.get("$schema", DEFAULT_DIALECT), where)
    try:
        validator = cls(schema, offline=True)
    except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as exc:
        raise SchemaError(f"{where}: invalid {dialect} JSON schema: {_first_line(str(exc))}") from None
    return CompiledSchema(dialect, validator)


__all__ = [
    "DEFAULT_DIALECT", "MAX_VIOLATIONS", "SEARCHED_VALUES", "CompiledSchema", "SchemaError", "SchemaMismatchError",
    "compile_schema",
]
