"""A JSON document a client sends the control plane in a text field (a state value, a policy's spec_json, an
escalation's context or answer), read as json reads it but refused where json reads what JSON is not.

- NaN, Infinity and -Infinity: json reads them, but they are no JSON. Stored, they read back as `NaN`, which
  no JSON reader takes (`--json` output broke), and numbers that compare false with everything.
- Nesting past what json's recursive reader can read: a RecursionError, which is not a ValueError.

Either is InvalidInputError naming the field, as any text that is not JSON is.
"""

from __future__ import annotations

from typing import Any

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import InvalidInputError


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load(text: str | bytes, field: str) -> Any:
    """text's value as json reads it; InvalidInputError (`<field>: not valid JSON: ...` or `<field>: nested too
    deeply`, and a field violation saying the same) when it is not JSON, holds NaN or infinity, or nests past
    what json reads."""
    try:
        return json_depth.loads(text, parse_constant=_no_constant)
    except RecursionError:
        msg = "nested too deeply"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and the constants above
        msg = f"not valid JSON: {exc}"
    raise InvalidInputError(f"{field}: {msg}", field_violations={field: msg})
