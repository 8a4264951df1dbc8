"""Operator YAML (and JSON, which is YAML) read safely, for every loader of policy and grant text.

- A syntax error is one readable line (`yaml_error_text`): PyYAML's own text names the stream it was given,
  `<unicode string>` for text read first, and spreads over several lines; operators need `policies.yaml: not
  valid YAML/JSON at line 3, column 9: ...` instead.
- Nesting past what PyYAML's recursive composer reads is refused, not a RecursionError.
- Aliases may be used, but what they expand to is bounded (`MAX_VALUES`). PyYAML shares an aliased node instead
  of copying it, so 551 bytes of aliases nested nine deep ("billion laughs") load at once as 10^9 values; the
  policy validation then walked them for ever, holding the control plane's event loop.
- A key written twice in one mapping is refused, naming both lines. PyYAML keeps the last silently, so a rule
  reading `action: DENY` with a later `action: ALLOW` was stored as ALLOW, and a second `spec:` replaced the
  first. Keys a `<<` merge brings in may still be overridden: that is what a merge is for.
- An integer is at most `MAX_INT_CHARS` characters: Python refuses longer decimal text with a ValueError that
  named no file, and a YAML 1.1 base-60 integer (`1:2:3...`) costs time quadratic in its length.
"""

from __future__ import annotations

from typing import Any, Final

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode

from hivemesh.mesh.errors import InvalidInputError

MAX_VALUES: Final = 100_000
"""Values (mappings, sequences, keys and scalars) a text may hold once its aliases are expanded."""
MAX_INT_CHARS: Final = 4300
"""The longest integer text read (Python's own bound on decimal text, `sys.get_int_max_str_digits`)."""
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader refusing a repeated key and an over-long integer (see the module's docstring)."""

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        # Checked as composed, before `<<` merges are flattened into the mapping: they may repeat a key.
        node = super().compose_mapping_node(anchor)
        first: dict[Any, int] = {}  # key -> the index of its pair (an alias repeats the very node)
        for i, (key_node, _) in enumerate(node.value):
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # a complex key is refused as unhashable when constructed
            key = self.construct_object(key_node)
            try:
                earlier = first.setdefault(key, i)
            except TypeError:
                continue
            if earlier != i:
                raise ConstructorError(None, None, f"key {key!r} is given twice in one mapping (first at line "
                                       f"{node.value[earlier][0].start_mark.line + 1}): which one was meant?",
                                       key_node.start_mark)
        return node

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:  # a value PyYAML cannot make, e.g. the date 2024-13-45: named with its line
            raise ConstructorError(None, None, str(exc), node.start_mark) from None

    def construct_yaml_int(self, node: ScalarNode) -> int:
        text = self.construct_scalar(node)
        if len(text) > MAX_INT_CHARS:
            raise ConstructorError(None, None, f"an integer of {len(text):,} characters (at most {MAX_INT_CHARS:,})",
                                   node.start_mark)
        return super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def yaml_error_text(exc: yaml.YAMLError, source: str) -> str:
    """`<source>: not valid YAML/JSON at line L, column C: <what the parser expected and found>`."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem, context = getattr(exc, "problem", None), getattr(exc, "context", None)
    what = ", ".join(str(p) for p in (context, problem) if p) if problem else str(exc).splitlines()[0]
    return f"{source}: not valid YAML/JSON{where}: {what}"


def load_all(text: str, source: str) -> list[Any]:
    """The non-empty documents of a multi-document stream; InvalidInputError naming source when it cannot be read."""
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidInputError(yaml_error_text(exc, source)) from None
    except RecursionError:  # PyYAML composes recursively: ~1,000 levels exhaust the stack
        raise InvalidInputError(f"{source}: nested too deeply") from None
    except ValueError as exc:  # none is expected (`_Loader.construct_object`), but never one without the source
        raise InvalidInputError(f"{source}: {exc}") from None
    _bounded(docs, source)
    return docs


def load(text: str, source: str) -> Any:
    """The one document of text (None when empty); InvalidInputError naming source when it cannot be read."""
    try:
        doc = yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        raise InvalidInputError(yaml_error_text(exc, source)) from None
    except RecursionError:
        raise InvalidInputError(f"{source}: nested too deeply") from None
    except ValueError as exc:
        raise InvalidInputError(f"{source}: {exc}") from None
    _bounded(doc, source)
    return doc


def _bounded(value: Any, source: str) -> None:
    """Refuse value when it holds more than MAX_VALUES values counted as every reader walks them (an alias once
    per use): the walk stops there, so an alias bomb costs at most that."""
    stack = [value]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise InvalidInputError(f"{source}: more than {MAX_VALUES:,} values once its aliases are expanded")
        if isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
