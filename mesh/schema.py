"""Capability payload schemas: compiled once per capability, checked on every call, in the dialect they declare.

JSON Schema 2020-12 is the default dialect (what A2A and the OpenAI tool format use); a schema may declare
draft-04, -06, -07 or 2019-09 with `$schema` and is then read by that draft's rules. Any other `$schema` is
refused when the schema is compiled (an agent's card at registration, an SDK capability at import), so a
schema is never read by the wrong rules. The validator is jsonschema-rs: complete for every draft above and
the fastest measured on the call path (bench/schema_validators.py; figures in the README's "Dependencies").
Remote `$ref`s are never fetched: a schema must be self-contained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

import jsonschema_rs

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


class SchemaMismatchError(ValueError):
    """A value that does not match its schema: where (a field path such as `input.items[2].sku`) and why."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


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


@dataclass(frozen=True, slots=True)
class CompiledSchema:
    """One compiled schema; `check` raises `SchemaMismatchError` naming the first failing field."""

    dialect: str
    """"2020-12", "draft-07", ...: the rules the schema is read by."""
    _validator: Any

    def check(self, value: Any, *, root: str = "input") -> None:
        """Raises SchemaMismatchError (path under `root`) on a mismatch, and SchemaMismatchError at `root` for a value
        with no JSON form (a lone surrogate) or nested too deeply to validate."""
        try:
            self._validator.validate(value)
        except jsonschema_rs.ValidationError as exc:
            raise SchemaMismatchError(_path(exc.instance_path, root), _first_line(exc.message)) from None
        except RecursionError:
            raise SchemaMismatchError(root, "nested too deeply to validate") from None
        except ValueError as exc:  # jsonschema-rs's recursion limit, or a string that is not valid Unicode
            text = str(exc)
            why = "nested too deeply to validate" if "ecursion" in text else f"not valid JSON data: {text}"
            raise SchemaMismatchError(root, why) from None


def compile_schema(schema_text: str, *, where: str) -> CompiledSchema | None:
    """Compile a schema (JSON text) once; None for an empty one (any JSON).

    Raises:
        SchemaError: naming `where`, for text that is not a JSON Schema object, an unsupported `$schema`, or a
            schema invalid in its dialect (say, `items` given as an array under 2020-12).
    """
    if not schema_text:
        return None
    try:
        schema = json.loads(schema_text)
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


__all__ = ["DEFAULT_DIALECT", "CompiledSchema", "SchemaError", "SchemaMismatchError", "compile_schema"]
