"""JSON Schema from Python type hints, so an agent's capabilities describe their inputs and outputs
without the author writing schemas by hand (declared schemas always win)."""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import math
import types
import typing
from collections.abc import Callable, Generator
from typing import Any, Final, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

from hivemesh.mesh.errors import InvalidInputError

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
    """The JSON Schema of a type hint: primitives, Optional/Union, Literal, Enum, list, set, dict, TypedDict,
    dataclass.

    Raises:
        TypeError: for a hint that has no JSON form, naming it, so a bad capability fails at import time.
    """
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is typing.Annotated:  # first: its metadata may be unhashable (Annotated[int, {"unit": "s"}])
        return schema_for(args[0], _outer)
    primitive = next((v for k, v in _PRIMITIVES.items() if tp is k), None)  # by identity: hashing a generic
    if primitive is not None:                                              # hashes its (maybe unhashable) args
        return dict(primitive)
    if origin in (Union, types.UnionType):
        return {"anyOf": [schema_for(a, _outer) for a in args]}
    if origin is Literal:  # an Enum member stands for its value (decoded back to the member)
        for member in args:
            if not _is_scalar(_plain(member)):
                why = (f"the {type(member).__name__} member {member}, whose value is {member.value!r}"
                       if isinstance(member, enum.Enum) else f"{member!r}, a {type(member).__name__}")
                raise TypeError(f"no JSON schema for {tp!r}: a Literal's values must be str, int, float, bool or "
                                f"None, not {why}")
        return {"enum": [_plain(a) for a in args]}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_schema(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[int, str]: each position its own type
        return {"type": "array", "prefixItems": [schema_for(a, _outer) for a in args], "items": False,
                "minItems": len(args), "maxItems": len(args)}
    if origin in _SETS:  # decoded to a set or frozenset, so its items must be hashable
        items = args[0] if args else Any
        if (unhashable := _unhashable(items)) is not None:
            raise TypeError(f"no JSON schema for {tp!r}: a set's items must be hashable, and {unhashable} is not")
        return {"type": "array", "items": schema_for(items, _outer), "uniqueItems": True}
    if origin in (list, tuple, collections.abc.Sequence):
        items = args[0] if args else Any
        return {"type": "array", "items": schema_for(items, _outer)}
    if origin in (dict, collections.abc.Mapping):
        value = args[1] if len(args) == 2 else Any
        keys = _key_enum(args[0]) if args else None
        if keys is None:
            return {"type": "object", "additionalProperties": schema_for(value, _outer)}
        try:
            names = list(_key_members(keys))
        except TypeError as exc:
            raise TypeError(f"no JSON schema for {tp!r}: {exc}") from None
        return {"type": "object", "propertyNames": {"enum": names}, "additionalProperties": schema_for(value, _outer)}
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


def _is_scalar(value: Any) -> bool:
    """A JSON scalar: str, int, a finite float, bool or None (NaN and infinities are no JSON)."""
    return value is None or isinstance(value, (str, int, bool)) or (isinstance(value, float) and math.isfinite(value))


def _plain(choice: Any) -> Any:
    """A Literal's value or an Enum's member as JSON has it: the member's value."""
    return choice.value if isinstance(choice, enum.Enum) else choice


def _enum_schema(tp: type[enum.Enum]) -> JsonSchema:
    """{"enum": the members' values}, with "type" when they all have one JSON type (ints and floats: "number")."""
    where = f"no JSON schema for the Enum {tp.__module__}.{tp.__qualname__}"
    if issubclass(tp, enum.Flag):
        raise TypeError(f"{where}: a Flag's members combine into values that no list of them holds; hint int, or a "
                        "set of a plain Enum, and build the Flag in the handler")
    values = [m.value for m in tp]
    if not values:
        raise TypeError(f"{where}: it has no members, so no value would be accepted")
    for member in tp:
        if not _is_scalar(member.value):
            raise TypeError(f"{where}: its member {member.name} has the value {member.value!r}, a "
                            f"{type(member.value).__name__}; an Enum's values must be str, int, float, bool or None")
    kinds = {_json_type(v) for v in values}
    if kinds == {"integer", "number"}:
        kinds = {"number"}
    return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 else {"enum": values}


def _key_enum(tp: Any) -> type[enum.Enum] | None:
    """The Enum a dict's key hint is (Annotated or not), else None: its keys are then taken as they come."""
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    return tp if isinstance(tp, type) and issubclass(tp, enum.Enum) else None


@functools.lru_cache(maxsize=256)
def _key_members(tp: type[enum.Enum]) -> dict[str, enum.Enum]:
    """An Enum's members by the JSON object key each stands for: a str value itself, an int value in decimal (as
    json writes an int key), so a dict keyed by it has one schema, decoding and encoding.

    Raises:
        TypeError: for an Enum with a member that no key can stand for (a value neither str nor int), two members
            one key ("1" and 1), a Flag, or no members, saying which.
    """
    where = f"its keys, the Enum {tp.__module__}.{tp.__qualname__},"
    if issubclass(tp, enum.Flag):
        raise TypeError(f"{where} are a Flag, whose members combine into values that no key names; key by a plain "
                        "Enum")
    table: dict[str, enum.Enum] = {}
    for member in tp:
        value = member.value
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise TypeError(f"{where} must have str or int values (a JSON object's keys are strings), and its member "
                            f"{member.name} has the value {value!r}, a {type(value).__name__}")
        key = _key_text(value)
        if key in table:
            raise TypeError(f"{where} have members {table[key].name} and {member.name} that are one JSON key, {key!r}")
        table[key] = member
    if not table:
        raise TypeError(f"{where} have no members, so no key would be accepted")
    return table


def _key_text(value: str | int) -> str:
    """The JSON object key a member's value is: the string itself, or an int's decimal digits (a str or int
    subclass, such as another Enum's member, as its plain value)."""
    return str.__str__(value) if isinstance(value, str) else int.__repr__(value)


def _json_type(scalar: Any) -> str:
    """A scalar's JSON Schema type (bool asked first: True is an int in Python)."""
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if isinstance(scalar, kind):
            return name
    return "null"


def _unhashable(tp: Any) -> str | None:
    """What in a set's item hint decodes to a value no set can hold (a dict, a list, a mutable dataclass), else
    None; Any is let through (its values are checked as they come)."""
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    origin = get_origin(tp)
    if origin in _UNIONS or (origin is tuple and get_args(tp)):
        return next((why for a in get_args(tp) if a is not Ellipsis and (why := _unhashable(a)) is not None), None)
    if tp in (dict, list) or is_typeddict(tp) or origin in (dict, list, set, collections.abc.Mapping,
                                                               collections.abc.Sequence):
        return tp.__qualname__ if isinstance(tp, type) else repr(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type) and tp.__hash__ is None:
        return f"the dataclass {tp.__qualname__} (make it frozen=True)"
    return None


def _init_fields(tp: type) -> list[dataclasses.Field[Any]]:
    """The fields a dataclass is built from: one with init=False is not an input (passing it raises)."""
    return [f for f in dataclasses.fields(tp) if f.init]


def from_json(tp: Any, value: Any) -> Any:
    """Build the handler's argument from validated JSON, as its hint says: dataclasses are constructed wherever the
    hint puts them (nested, in lists, tuples, dict values, TypedDict fields, and the arms of an Optional or Union),
    tuples made tuples, sets sets, an Enum's value (or a Literal's of Enum members) its member, a dict's key its
    member where the key hint is an Enum ("1" for an int-valued one), and a whole float such as 1.0 (JSON Schema's
    "integer" admits it) made the int the hint promises. A value whose hint needs none of this (str, float, a
    TypedDict of strings) is returned as it is.

    It takes time linear in the value's size and no interpreter stack per level (`_walk`): a recursive input, which
    an author declares with $defs/$ref, is as cheap to decode as it was to parse, however deep the parser let it be.

    Raises:
        InvalidInputError: for a set whose items are distinct in JSON but one value in Python (true and 1), or
            cannot be in a set (a list, under set[Any]): what the schema's uniqueItems does not catch; and for a
            key no member of a dict's key Enum stands for (a declared schema let it through).
    """
    now = _decode_now(tp, value)
    if now is not _LATER:
        return now
    try:
        return _walk(tp, value)
    except _RefusedError as exc:
        raise InvalidInputError(str(exc)) from None


_Steps = Generator["_Ask", Any, Any]
_Ask = tuple[Callable[[Any, Any], _Steps], Any, Any]
"""A step's question about a nested value, for `_walk`: (step, hint, value)."""
_LATER: Final = object()
"""`_decode_now`'s answer for a value that takes a step of its own."""


def _walk(tp: Any, value: Any) -> Any:
    """Decode the value by the hint in steps (`_decode`, `_fits_exactly`, `_fits_loosely`). A step yields an `_Ask`
    for each nested value it cannot answer at once and is sent the answer (or thrown the exception: a constructor's
    TypeError, say), so the walk keeps its place on a list, not on the interpreter's stack: a value 10,000 levels
    deep is no RecursionError.

    Only a Union's arms ask about one value twice (fitting it to each arm, building it by the next arm when one's
    constructor refused it), so while a Union is being decided each answer is kept, by step, hint and the value's
    identity, and no subtree is walked again: the cost stays linear in the value's size, not exponential in its
    depth. The answers are let go when the outermost Union is decided (a long list of Optional[X] keeps none)."""
    answers: dict[tuple[Any, int, int], tuple[Any, Exception | None, Any]] = {}
    stack: list[tuple[_Steps, tuple[Any, int, int] | None, Any, bool]] = []
    unions = 0  # Union steps on the stack
    ask: _Ask | None = (_decode, tp, value)
    reply: Any = None
    failure: Exception | None = None
    while True:
        if ask is not None:
            fn, tp, value = ask
            key = (fn, id(tp), id(value)) if unions else None  # the value is alive for the whole walk
            known = answers.get(key) if key is not None else None
            if known is None:
                union = fn is _decode and _is_union(tp)
                unions += union
                stack.append((fn(tp, value), key, tp, union))
                reply, failure = None, None
            else:
                reply, failure, _ = known
        step, key, hint, union = stack[-1]
        try:
            ask = step.send(reply) if failure is None else step.throw(failure)
            continue
        except StopIteration as done:
            ask, reply, failure = None, done.value, None
        except Exception as exc:  # noqa: BLE001 - raised in the step that asked, as a nested call's would be
            ask, reply, failure = None, None, exc
        stack.pop()
        if key is not None:  # the hint is kept with its answer, so its id is no other's while the answer is
            answers[key] = (reply, failure, hint)
        if union:
            unions -= 1
            if not unions:
                answers.clear()
        if not stack:
            if failure is not None:
                raise failure
            return reply


def _decode_now(tp: Any, value: Any) -> Any:
    """The value decoded by the hint where that takes no step (the hint changes nothing, or is int, an Enum or a
    Literal), else _LATER."""
    how = _how(tp)
    if how == _AS_IS:
        return value
    if how == _STEP:
        return _LATER
    if how == _INT:
        return _whole(value)
    if how == _CHOICE:  # Literal[1] admits 1.0 too (JSON Schema compares numbers by value): give the 1
        chosen = _chosen(tp, value)
        return value if chosen is _NONE else chosen
    return _decode_now(get_args(tp)[0], value)  # _UNWRAP: Annotated


def _decode(tp: Any, value: Any) -> _Steps:
    """from_json's step for a hint `_decode_now` cannot answer alone: its nested values are asked of `_walk`."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            return value
        kwargs: dict[str, Any] = {}
        for name, hint, _ in _inputs(tp):
            if name in value:
                now = _decode_now(hint, v := value[name])
                kwargs[name] = (yield (_decode, hint, v)) if now is _LATER else now
        return tp(**kwargs)
    if is_typeddict(tp):
        if not isinstance(value, dict):
            return value
        hints = _field_hints(tp)
        typed: dict[str, Any] = {}
        for k, v in value.items():
            now = _decode_now(hints[k], v) if k in hints else v
            typed[k] = (yield (_decode, hints[k], v)) if now is _LATER else now
        return typed
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is typing.Annotated:
        return (yield from _decode(args[0], value))
    if origin in _UNIONS:
        # The arm the schema's anyOf admitted the value by. A dataclass or TypedDict arm before a plain dict or Any
        # arm, so Union[dict, Cfg] builds the Cfg (as it always did); an exact fit before a loose one, so int | float
        # keeps 1.0 a float where Optional[int] makes it 1.
        structured = [a for a in args if _is_structured(a)] if isinstance(value, dict) else []
        refused: _RefusedError | None = None  # a set or keyed arm's refusal, said if no arm takes the value
        for arms in (structured, [a for a in args if a not in structured]):
            for strict in (True, False):
                for arm in arms:
                    fit = _fits_now(arm, value, strict)
                    if fit is None:
                        fit = yield (_fits_exactly if strict else _fits_loosely, arm, value)
                    if fit:
                        try:
                            now = _decode_now(arm, value)
                            return (yield (_decode, arm, value)) if now is _LATER else now
                        except TypeError as exc:  # its constructor refused the value (a __post_init__ check) or
                            if isinstance(exc, _RefusedError):  # its items made no set, or a key no
                                refused = refused or exc          # member: next arm
                            continue
        for arm in args:  # a declared schema may admit what the hints do not: the first dataclass arm it builds
            if dataclasses.is_dataclass(arm) and isinstance(value, dict):
                try:
                    return (yield (_decode, arm, value))
                except TypeError:
                    continue
        if refused is None and isinstance(value, dict):  # no arm took it: a key of an Enum-keyed arm that no
            refused = next((_RefusedError(why) for arm in args  # member stands for is refused, as it is alone
                            if (why := _unknown_key_in(arm, value)) is not None), None)
        if refused is not None:  # not the list or the str keys, where the hint promised a set or members
            raise refused
        return value
    if origin is tuple and isinstance(value, list):
        fixed = bool(args) and args[-1] is not Ellipsis  # tuple[int, str]: each position its own hint
        hinted = zip(args, value, strict=False) if fixed else ((args[0] if args else Any, v) for v in value)
        items: list[Any] = []
        for hint, v in hinted:
            now = _decode_now(hint, v)
            items.append((yield (_decode, hint, v)) if now is _LATER else now)
        return tuple(items)
    if origin in _SEQUENCES and isinstance(value, list):
        item = args[0] if args else Any
        decoded: list[Any] = []
        for v in value:
            now = _decode_now(item, v)
            decoded.append((yield (_decode, item, v)) if now is _LATER else now)
        return _as_set(tp, decoded) if origin in _SETS else decoded
    if origin in (dict, collections.abc.Mapping) and isinstance(value, dict) and len(args) == 2:
        keys = _key_enum(args[0])
        members = _key_members(keys) if keys is not None else {}
        mapped: dict[Any, Any] = {}
        for k, v in value.items():
            if keys is not None and not isinstance(k, keys):  # JSON's key (a member passed in Python stays one)
                member = members.get(k) if type(k) is str else None
                if member is None:
                    raise _RefusedError(_unknown_key(tp, k, members))
                k = member
            now = _decode_now(args[1], v)
            mapped[k] = (yield (_decode, args[1], v)) if now is _LATER else now
        return mapped
    return value


_SETS = (set, frozenset, collections.abc.Set)
_SEQUENCES = (list, collections.abc.Sequence, *_SETS)
_UNIONS = (Union, types.UnionType)
_NONE: Final = object()
"""`_chosen`'s answer for a value that is none of the choices."""


class _RefusedError(TypeError):
    """Decoded items that make no set, or a key no member of the hint's key Enum stands for: a Union tries its next
    arm (as on a constructor's TypeError); from_json's caller gets InvalidInputError."""


def _unknown_key_in(tp: Any, value: dict[Any, Any]) -> str | None:
    """What `_unknown_key` says of the value's first key that no member of the hint's key Enum stands for, if the
    hint is an Enum-keyed dict (Annotated or not) and there is such a key, else None."""
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    args = get_args(tp)
    if get_origin(tp) not in (dict, collections.abc.Mapping) or len(args) != 2 or (keys := _key_enum(args[0])) is None:
        return None
    members = _key_members(keys)
    key = next((k for k in value if not isinstance(k, keys) and (type(k) is not str or k not in members)), _NONE)
    return None if key is _NONE else _unknown_key(tp, key, members)


def _unknown_key(tp: Any, key: Any, members: dict[str, enum.Enum]) -> str:
    """What InvalidInputError says of a key that no member stands for: the key (cut short) and the keys there are."""
    shown = repr(key) if len(repr(key)) <= 80 else repr(key)[:77] + "..."
    known = ", ".join(repr(k) for k in list(members)[:20]) + (", ..." if len(members) > 20 else "")
    return f"a {tp!r} in the input has the key {shown}, which is none of {known}"


def _as_set(tp: Any, items: list[Any]) -> set[Any] | frozenset[Any]:
    """The items as the set the hint says (a frozenset for frozenset and AbstractSet), refusing items a set cannot
    hold or would merge: the schema's uniqueItems saw them distinct (true and 1 are, in JSON), so merging them
    would drop one of the caller's values without a word."""
    try:
        made = set(items) if get_origin(tp) is set else frozenset(items)
        if len(made) != len(items):
            first: dict[Any, Any] = {}
            for v in items:
                if v in first:
                    raise _RefusedError(f"a {tp!r} in the input holds {first[v]!r} and {v!r}, distinct in JSON "
                                        "but one value in Python: send one of them")
                first[v] = v
    except TypeError as exc:
        if isinstance(exc, _RefusedError):
            raise
        raise _RefusedError(f"a {tp!r} in the input holds an item no set can hold: {exc}") from None
    except RecursionError:  # hashing a frozen dataclass of tuples recurses: an item nested past the stack
        raise _RefusedError(f"a {tp!r} in the input holds an item nested too deeply to hash") from None
    return made


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_union(tp: Any) -> bool:
    """A Union or Optional hint (Annotated or not)."""
    while (origin := get_origin(tp)) is typing.Annotated:
        tp = get_args(tp)[0]
    return origin in _UNIONS


def _is_structured(tp: Any) -> bool:
    """A dataclass or TypedDict hint (Annotated or not): a Union builds an object by it before a dict or Any arm."""
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    return is_typeddict(tp) or (dataclasses.is_dataclass(tp) and isinstance(tp, type))


def _whole(value: Any) -> Any:
    """A whole float as the int it is; anything else (bool, a fractional float) as it is."""
    return int(value) if type(value) is float and value.is_integer() else value


_AS_IS, _INT, _CHOICE, _UNWRAP, _STEP = range(5)
"""How `_decode_now` decodes by a hint: not at all, as an int, to an Enum member or Literal value, by the hint an
Annotated wraps, or in a step of `_walk`."""


def _how(tp: Any) -> int:
    """How a hint decodes (`_AS_IS`...). Most hints are asked on every call, so the answer is kept per hint."""
    try:
        return _how_cached(tp)
    except TypeError:  # unhashable Annotated metadata: worked out each time
        return _how_of(tp)


@functools.lru_cache(maxsize=1024)
def _how_cached(tp: Any) -> int:
    return _how_of(tp)


def _how_of(tp: Any) -> int:
    if not _changes(tp, ()):
        return _AS_IS
    if tp is int:
        return _INT
    origin = get_origin(tp)
    if origin is Literal or isinstance(tp, enum.EnumMeta):
        return _CHOICE
    return _UNWRAP if origin is typing.Annotated else _STEP


@functools.lru_cache(maxsize=256)
def _choices(tp: Any) -> dict[tuple[type, Any], Any]:
    """An Enum's members, or a Literal's values, by JSON kind and value: what a JSON value decodes to. 1.0 finds
    the member or value 1 (a whole float is the int, as for an int hint); true never finds 1."""
    table: dict[tuple[type, Any], Any] = {}
    for choice in (tp if isinstance(tp, enum.EnumMeta) else get_args(tp)):
        value = _plain(choice)
        table.setdefault((_kind(value), value), choice)
    return table


def _chosen(tp: Any, value: Any) -> Any:
    """The Enum member or Literal value that the JSON value is, else _NONE (a declared schema admitted another)."""
    try:
        return _choices(tp).get((_kind(value), value), _NONE)
    except TypeError:  # an unhashable value (a list) is none of them
        return _NONE


def _changes(tp: Any, seen: tuple[Any, ...]) -> bool:
    """Whether decoding by this hint can change a value: it holds an int, a dataclass, a tuple, a set or an Enum
    somewhere."""
    if tp is int or (dataclasses.is_dataclass(tp) and isinstance(tp, type)) or isinstance(tp, enum.EnumMeta):
        return True
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is tuple or origin in _SETS:
        return True
    if origin is Literal:
        return any(_is_int(a) or isinstance(a, enum.Enum) for a in args)
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


@functools.lru_cache(maxsize=256)
def _inputs(tp: type) -> tuple[tuple[str, Any, bool], ...]:
    """A dataclass's fields it is built from, as (name, resolved hint, required), worked out once per class."""
    hints = _field_hints(tp)
    return tuple((f.name, hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                 for f in _init_fields(tp))


def _fits_now(tp: Any, value: Any, strict: bool) -> bool | None:
    """Whether a JSON value is one the hint describes, to pick a Union's arm, as far as the value's own shape says:
    None when that depends on its nested values (`_fits`). Strict: an int hint takes an int only, not a whole
    float. Extra keys in an object are overlooked (decoding drops them from a dataclass)."""
    if tp is Any or tp is object:
        return True
    if isinstance(tp, type) and tp in _KINDS:
        if tp is int and not strict and type(value) is float:
            return value.is_integer()
        return type(value) in _KINDS[tp]
    if isinstance(tp, enum.EnumMeta):
        return _fits_choice(tp, value, strict)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return None if isinstance(value, dict) and all(
            name in value for name, _, required in _inputs(tp) if required) else False
    if is_typeddict(tp):
        return None if isinstance(value, dict) and all(
            k in value for k in getattr(tp, "__required_keys__", _field_hints(tp).keys())) else False
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is typing.Annotated:
        return _fits_now(args[0], value, strict)
    if origin in _UNIONS:
        return None
    if origin is Literal:
        return _fits_choice(tp, value, strict)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return None if isinstance(value, list) and len(value) == len(args) else False
    if origin in (tuple, *_SEQUENCES):
        return None if isinstance(value, list) else False
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            return False
        keys = _key_enum(args[0]) if args else None
        return None if keys is None or _key_members(keys).keys() >= value.keys() else False
    return False


def _fits_choice(tp: Any, value: Any, strict: bool) -> bool:
    """Whether the JSON value is one of an Enum's or a Literal's; strict: an int one only as an int, not 1.0."""
    chosen = _chosen(tp, value)
    return chosen is not _NONE and not (strict and type(value) is float and _is_int(_plain(chosen)))


def _fits(tp: Any, value: Any, strict: bool) -> _Steps:
    """The step for what `_fits_now` cannot answer alone: whether the nested values fit their hints too (a Union's:
    whether one of its arms fits), each asked of `_walk`."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        nested: typing.Iterable[tuple[Any, Any]] = ((hint, value[name]) for name, hint, _ in _inputs(tp)
                                                    if name in value)
    elif is_typeddict(tp):
        hints = _field_hints(tp)
        nested = ((hints[k], v) for k, v in value.items() if k in hints)
    else:
        origin = get_origin(tp)
        args = get_args(tp)
        if origin is typing.Annotated:
            return (yield from _fits(args[0], value, strict))
        if origin in _UNIONS:
            for arm in args:
                fit = _fits_now(arm, value, strict)
                if fit or (fit is None and (yield (_fits_exactly if strict else _fits_loosely, arm, value))):
                    return True
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            nested = zip(args, value, strict=True)
        elif origin in (dict, collections.abc.Mapping):
            nested = ((args[1] if len(args) == 2 else Any, v) for v in value.values())
        else:  # a list, tuple[X, ...], Sequence or set
            nested = ((args[0] if args else Any, v) for v in value)
    for hint, v in nested:
        fit = _fits_now(hint, v, strict)
        if not (fit or (fit is None and (yield (_fits_exactly if strict else _fits_loosely, hint, v)))):
            return False
    return True


def _fits_exactly(tp: Any, value: Any) -> _Steps:
    """_fits with an int hint taking an int only: a Union's arms are tried so first (int | float keeps 1.0 a float)."""
    return _fits(tp, value, True)


def _fits_loosely(tp: Any, value: Any) -> _Steps:
    """_fits with an int hint taking a whole float too, as JSON Schema's "integer" does."""
    return _fits(tp, value, False)


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
    """Turn a handler's result into JSON-serializable data: dataclasses become dicts, tuples lists, sets lists
    (sorted when their items are, so the same set is the same answer), Enum members their values, wherever they
    are in the result; a member that is a dict's key becomes the JSON key its value is (an int in decimal, as json
    writes an int key), the key its input would be decoded from. A result nested past the interpreter's reach is
    left as it is, for the encoder to refuse as not JSON."""
    try:
        return _to_json(value)
    except RecursionError:
        return value


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    kind = type(value)
    if kind is dict:
        if _needs_conversion(value.values()) or _needs_conversion(value):  # a value, or a key (an Enum member)
            return {_json_key(k): _to_json(v) for k, v in value.items()}
        return value
    if kind is list or kind is tuple:
        return [_to_json(v) for v in value] if kind is tuple or _needs_conversion(value) else value
    if kind is set or kind is frozenset:
        items = [_to_json(v) for v in value]
        try:
            return sorted(items)
        except TypeError:  # items with no order (dicts, or str beside int): as the set iterates them
            return items
    return value.value if isinstance(kind, enum.EnumMeta) else value  # the class's class: no __instancecheck__


def _json_key(key: Any) -> Any:
    """A result dict's key as JSON has it: an Enum member with a str or int value that value's key text, any other
    key as it is (json writes or refuses it)."""
    if not isinstance(type(key), enum.EnumMeta):
        return key
    value = key.value
    return _key_text(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else value


_PLAIN = (str, int, float, bool, type(None))
_PLAIN_TYPES: Final = frozenset(_PLAIN)


def _needs_conversion(items: typing.Iterable[Any]) -> bool:
    """Whether a container holds anything to_json changes (most results hold only plain values: returned as is).
    Iterated in C (no generator frame per item): a plain dict result is checked twice, values and keys (Enum
    members), and with a generator that check made to_json 1.4-1.8x as slow (echo's dict result: 655 -> 910 ns)."""
    return not _PLAIN_TYPES.issuperset(map(type, items))
