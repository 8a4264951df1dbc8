"""JSON Schema from Python type hints, so an agent's capabilities describe their inputs and outputs
without the author writing schemas by hand (declared schemas always win)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

JsonSchema = dict[str, Any]

_PRIMITIVES: dict[Any, JsonSchema] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    Any: {},
    dict: {"type": "object"},
    list: {"type": "array"},
}


def schema_for(tp: Any) -> JsonSchema:
    """The JSON Schema of a type hint: primitives, Optional/Union, Literal, list, dict, TypedDict, dataclass.

    Raises:
        TypeError: for a hint that has no JSON form, naming it, so a bad capability fails at import time.
    """
    if tp in _PRIMITIVES:
        return dict(_PRIMITIVES[tp])
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is typing.Annotated:
        return schema_for(args[0])
    if origin in (Union, types.UnionType):
        return {"anyOf": [schema_for(a) for a in args]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, set, frozenset, typing.Sequence) or (origin is not None and origin is list):
        items = args[0] if args else Any
        return {"type": "array", "items": schema_for(items)}
    if origin is dict or origin is typing.Mapping:
        value = args[1] if len(args) == 2 else Any
        return {"type": "object", "additionalProperties": schema_for(value)}
    if is_typeddict(tp):
        hints = get_type_hints(tp)
        required = sorted(getattr(tp, "__required_keys__", hints.keys()))
        return {
            "type": "object",
            "properties": {k: schema_for(v) for k, v in hints.items()},
            "required": required,
            "additionalProperties": False,
        }
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = get_type_hints(tp)
        props: dict[str, JsonSchema] = {}
        required_fields: list[str] = []
        for f in dataclasses.fields(tp):
            props[f.name] = schema_for(hints[f.name])
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required_fields.append(f.name)
        return {
            "type": "object",
            "properties": props,
            "required": required_fields,
            "additionalProperties": False,
        }
    raise TypeError(f"no JSON schema for type {tp!r}: use JSON types, TypedDict or a dataclass")


def from_json(tp: Any, value: Any) -> Any:
    """Build the handler's argument from validated JSON (a dataclass is constructed, nested ones too)."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type) and isinstance(value, dict):
        hints = get_type_hints(tp)
        kwargs = {f.name: from_json(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value}
        return tp(**kwargs)
    origin = get_origin(tp)
    if origin is list and isinstance(value, list):
        (item,) = get_args(tp) or (Any,)
        return [from_json(item, v) for v in value]
    if origin is typing.Annotated:
        return from_json(get_args(tp)[0], value)
    return value


def to_json(value: Any) -> Any:
    """Turn a handler's result into JSON-serializable data (dataclasses become dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
