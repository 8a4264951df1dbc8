"""JSON Schema from Python type hints, so an agent's capabilities describe their inputs and outputs
without the author writing schemas by hand (declared schemas always win)."""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
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
        for member in args:
            if member is not None and not isinstance(member, (str, int, float, bool)):
                why = (f"the {type(member).__name__} member {member} (write the Literal of its value, "
                       f"{member.value!r})" if isinstance(member, enum.Enum)
                       else f"{member!r}, a {type(member).__name__}")
                raise TypeError(f"no JSON schema for {tp!r}: a Literal's values must be str, int, float, bool or "
                                f"None, not {why}")
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
    """Build the handler's argument from validated JSON, as its hint says: dataclasses are constructed wherever the
    hint puts them (nested, in lists, tuples, dict values, TypedDict fields, and the arms of an Optional or Union),
    tuples made tuples, and a whole float such as 1.0 (JSON Schema's "integer" admits it) made the int the hint
    promises. A value whose hint needs none of this (str, float, a TypedDict of strings) is returned as it is."""
    return _decode(tp, value) if _decodes(tp) else value


def _decode(tp: Any, value: Any) -> Any:
    """from_json for a hint `_decodes` said yes to (each nested hint is asked again)."""
    if tp is int:
        return _whole(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            return value
        hints = _field_hints(tp)
        return tp(**{f.name: from_json(hints[f.name], value[f.name]) for f in _init_fields(tp) if f.name in value})
    if is_typeddict(tp):
        if not isinstance(value, dict):
            return value
        hints = _field_hints(tp)
        return {k: from_json(hints[k], v) if k in hints else v for k, v in value.items()}
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is typing.Annotated:
        return from_json(args[0], value)
    if origin is Literal:  # Literal[1] admits 1.0 too (JSON Schema compares numbers by value): give the 1
        return _whole(value) if any(_is_int(a) and a == value for a in args) else value
    if origin in (Union, types.UnionType):
        # The arm the schema's anyOf admitted the value by: an exact fit first, so int | float keeps 1.0 a float.
        for strict in (True, False):
            for arm in args:
                if _fits(arm, value, strict=strict):
                    return from_json(arm, value)
        for arm in args:  # a declared schema may admit what the hints do not: the first dataclass arm it builds
            if dataclasses.is_dataclass(arm) and isinstance(value, dict):
                try:
                    return from_json(arm, value)
                except TypeError:
                    continue
        return value
    if origin is tuple and isinstance(value, list):
        if args and args[-1] is not Ellipsis:
            return tuple(from_json(a, v) for a, v in zip(args, value, strict=False))
        return tuple(from_json(args[0] if args else Any, v) for v in value)
    if origin in _SEQUENCES and isinstance(value, list):
        item = args[0] if args else Any
        return [_decode(item, v) for v in value] if _decodes(item) else value
    if origin in (dict, collections.abc.Mapping) and isinstance(value, dict) and len(args) == 2:
        return {k: _decode(args[1], v) for k, v in value.items()} if _decodes(args[1]) else value
    return value


_SEQUENCES = (list, collections.abc.Sequence, set, frozenset, collections.abc.Set)
_UNIONS = (Union, types.UnionType)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole(value: Any) -> Any:
    """A whole float as the int it is; anything else (bool, a fractional float) as it is."""
    return int(value) if type(value) is float and value.is_integer() else value


def _decodes(tp: Any) -> bool:
    """Whether decoding by this hint can change a value: it holds an int, a dataclass or a tuple somewhere. Most
    hints are asked on every call, so the answer is kept per hint."""
    try:
        hash(tp)
    except TypeError:  # unhashable Annotated metadata: worked out each time
        return _changes(tp, ())
    return _decodes_cached(tp)


@functools.lru_cache(maxsize=1024)
def _decodes_cached(tp: Any) -> bool:
    return _changes(tp, ())


def _changes(tp: Any, seen: tuple[Any, ...]) -> bool:
    if tp is int or (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
        return True
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is tuple:
        return True
    if origin is Literal:
        return any(_is_int(a) for a in args)
    if is_typeddict(tp):
        if tp in seen:  # a recursive TypedDict: its fields are being looked at already
            return False
        try:
            hints = _field_hints(tp)
        except Exception:  # noqa: BLE001 - hints that do not resolve: the value is passed as it is, as before
            return False
        return any(_changes(h, (*seen, tp)) for h in hints.values())
    if origin in (typing.Annotated, *_UNIONS, *_SEQUENCES, dict, collections.abc.Mapping):
        return any(_changes(a, seen) for a in args)
    return False


@functools.lru_cache(maxsize=256)
def _field_hints(tp: type) -> dict[str, Any]:
    """The resolved hints of a dataclass's or TypedDict's fields (get_type_hints is slow for every call)."""
    return get_type_hints(tp)


def _fits(tp: Any, value: Any, *, strict: bool) -> bool:
    """Whether a JSON value is one the hint describes, to pick a Union's arm. Strict: an int hint takes an int
    only, not a whole float. Extra keys in an object are overlooked (decoding drops them from a dataclass)."""
    if tp is Any or tp is object:
        return True
    if isinstance(tp, type) and tp in _KINDS:
        if tp is int and not strict and type(value) is float:
            return value.is_integer()
        return type(value) in _KINDS[tp]
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            return False
        hints = _field_hints(tp)
        fields = _init_fields(tp)
        return all(f.name in value for f in fields if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING) and all(
            _fits(hints[f.name], value[f.name], strict=strict) for f in fields if f.name in value)
    if is_typeddict(tp):
        if not isinstance(value, dict):
            return False
        hints = _field_hints(tp)
        required = getattr(tp, "__required_keys__", hints.keys())
        return all(k in value for k in required) and all(
            _fits(hints[k], v, strict=strict) for k, v in value.items() if k in hints)
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is typing.Annotated:
        return _fits(args[0], value, strict=strict)
    if origin in _UNIONS:
        return any(_fits(a, value, strict=strict) for a in args)
    if origin is Literal:
        return any(a == value and _kind(a) == _kind(value) and not (strict and _is_int(a) and type(value) is float)
                   for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return isinstance(value, list) and len(value) == len(args) and all(
            _fits(a, v, strict=strict) for a, v in zip(args, value, strict=True))
    if origin in (tuple, *_SEQUENCES):
        item = args[0] if args else Any
        return isinstance(value, list) and all(_fits(item, v, strict=strict) for v in value)
    if origin in (dict, collections.abc.Mapping):
        item = args[1] if len(args) == 2 else Any
        return isinstance(value, dict) and all(_fits(item, v, strict=strict) for v in value.values())
    return False


_KINDS: dict[Any, tuple[type, ...]] = {
    str: (str,), int: (int,), float: (int, float), bool: (bool,), type(None): (type(None),), dict: (dict,),
    list: (list,),
}
"""The Python types json gives for the values each plain hint describes."""


def _kind(value: Any) -> type:
    """A value's JSON type, for Literal matching: True == 1 in Python, never in JSON."""
    for kind, types_ in ((bool, bool), (float, (int, float)), (str, str)):
        if isinstance(value, types_):
            return kind
    return type(value)


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
