"""JSON Schema from Python type hints, so an agent's capabilities describe their inputs and outputs
without the author writing schemas by hand (declared schemas always win)."""

from __future__ import annotations

import collections.abc
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


def schema_for(tp: Any, _outer: tuple[Any, ...] = ()) -> JsonSchema:
    """The JSON Schema of a type hint: primitives, Optional/Union, Literal, list, dict, TypedDict, dataclass.

    Raises:
        TypeError: for a hint that has no JSON form, naming it, so a bad capability fails at import time.
    """
    if tp in _PRIMITIVES:
        return dict(_PRIMITIVES[tp])
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is typing.Annotated:
        return schema_for(args[0], _outer)
    if origin in (Union, types.UnionType):
        return {"anyOf": [schema_for(a, _outer) for a in args]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[int, str]: each position its own type
        return {"type": "array", "prefixItems": [schema_for(a, _outer) for a in args], "items": False,
                "minItems": len(args), "maxItems": len(args)}
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Set):
        items = args[0] if args else Any
        return {"type": "array", "items": schema_for(items, _outer)}
    if origin in (dict, collections.abc.Mapping):
        value = args[1] if len(args) == 2 else Any
        return {"type": "object", "additionalProperties": schema_for(value, _outer)}
    if (is_typeddict(tp) or dataclasses.is_dataclass(tp)) and tp in _outer:
        raise TypeError(f"no JSON schema for the recursive type {tp!r}: give the capability an input_schema or "
                        "output_schema that says it with $defs/$ref")
    if is_typeddict(tp):
        hints = get_type_hints(tp)
        required = sorted(getattr(tp, "__required_keys__", hints.keys()))
        return {
            "type": "object",
            "properties": {k: schema_for(v, (*_outer, tp)) for k, v in hints.items()},
            "required": required,
            "additionalProperties": False,
        }
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        hints = get_type_hints(tp)
        props: dict[str, JsonSchema] = {}
        required_fields: list[str] = []
        for f in _init_fields(tp):
            props[f.name] = schema_for(hints[f.name], (*_outer, tp))
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required_fields.append(f.name)
        return {
            "type": "object",
            "properties": props,
            "required": required_fields,
            "additionalProperties": False,
        }
    raise TypeError(f"no JSON schema for type {tp!r}: use JSON types, TypedDict or a dataclass")


def _init_fields(tp: type) -> list[dataclasses.Field[Any]]:
    """The fields a dataclass is built from: one with init=False is not an input (passing it raises)."""
    return [f for f in dataclasses.fields(tp) if f.init]


def from_json(tp: Any, value: Any) -> Any:
    """Build the handler's argument from validated JSON: dataclasses are constructed wherever the hint puts them
    (nested, in lists, tuples, dict values, and the arms of an Optional or Union), tuples made tuples."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type) and isinstance(value, dict):
        hints = get_type_hints(tp)
        kwargs = {f.name: from_json(hints[f.name], value[f.name]) for f in _init_fields(tp) if f.name in value}
        return tp(**kwargs)
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is typing.Annotated:
        return from_json(args[0], value)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        for arm in args:  # the first dataclass arm an object fits: the schema's anyOf admitted it
            if dataclasses.is_dataclass(arm) and isinstance(value, dict):
                try:
                    return from_json(arm, value)
                except TypeError:
                    continue
        return value
    if origin in (list, collections.abc.Sequence) and isinstance(value, list):
        item = args[0] if args else Any
        return [from_json(item, v) for v in value]
    if origin is tuple and isinstance(value, list):
        if args and args[-1] is not Ellipsis:
            return tuple(from_json(a, v) for a, v in zip(args, value, strict=False))
        return tuple(from_json(args[0] if args else Any, v) for v in value)
    if origin in (dict, collections.abc.Mapping) and isinstance(value, dict) and len(args) == 2:
        return {k: from_json(args[1], v) for k, v in value.items()}
    return value


def to_json(value: Any) -> Any:
    """Turn a handler's result into JSON-serializable data: dataclasses become dicts, sets and tuples lists,
    wherever they are in the result. A result nested past the interpreter's reach is left as it is, for the
    encoder to refuse as not JSON."""
    try:
        return _to_json(value)
    except RecursionError:
        return value


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    kind = type(value)
    if kind is dict:
        return {k: _to_json(v) for k, v in value.items()} if _needs_conversion(value.values()) else value
    if kind in (list, tuple, set, frozenset):
        return [_to_json(v) for v in value] if kind is not list or _needs_conversion(value) else value
    return value


_PLAIN = (str, int, float, bool, type(None))


def _needs_conversion(items: typing.Iterable[Any]) -> bool:
    """Whether a container holds anything to_json changes (most results hold only plain values: returned as is)."""
    return not all(type(v) in _PLAIN for v in items)
