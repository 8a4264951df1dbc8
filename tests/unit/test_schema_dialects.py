"""Capability schemas are read by the rules of the dialect they declare (2020-12 by default), and a schema
declaring a dialect the mesh does not know is refused when compiled, never read by the wrong rules."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hivemesh.mesh.schema import CompiledSchema, SchemaError, SchemaMismatchError, compile_schema
from hivemesh.sdk import Agent, capability

D2020 = "https://json-schema.org/draft/2020-12/schema"


def _compiled(schema: dict[str, Any]) -> CompiledSchema:
    compiled = compile_schema(json.dumps(schema), where="capability t")
    assert compiled is not None
    return compiled


def _violation(schema: dict[str, Any], value: Any) -> tuple[str, str] | None:
    try:
        _compiled(schema).check(value)
    except SchemaMismatchError as bad:
        return bad.path, bad.message
    return None


@pytest.mark.parametrize("declared", [{"$schema": D2020}, {}])
def test_2020_12_keywords_are_enforced(declared: dict[str, Any]) -> None:
    """prefixItems, $defs, dependentRequired and unevaluatedProperties: what a draft-07 validator ignores."""
    schema = {
        **declared,
        "$defs": {"qty": {"type": "integer", "minimum": 1}},
        "type": "object",
        "properties": {
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"$ref": "#/$defs/qty"}]},
            "card": {"type": "string"},
            "cvv": {"type": "string"},
        },
        "dependentRequired": {"card": ["cvv"]},
        "unevaluatedProperties": False,
    }
    assert _compiled(schema).dialect == "2020-12"
    assert _violation(schema, {"pair": ["a", 2], "card": "4111", "cvv": "123"}) is None
    assert _violation(schema, {"pair": ["a", 0]}) == ("input.pair[1]", "0 is less than the minimum of 1")
    assert _violation(schema, {"pair": [3, 1]})[0] == "input.pair[0]"  # type: ignore[index]
    assert _violation(schema, {"card": "4111"}) is not None  # dependentRequired
    assert _violation(schema, {"extra": 1}) is not None  # unevaluatedProperties


@pytest.mark.parametrize(
    ("uri", "dialect"),
    [
        ("http://json-schema.org/draft-04/schema#", "draft-04"),
        ("http://json-schema.org/draft-06/schema#", "draft-06"),
        ("http://json-schema.org/draft-07/schema#", "draft-07"),
        ("https://json-schema.org/draft-07/schema", "draft-07"),
        ("https://json-schema.org/draft/2019-09/schema", "2019-09"),
        ("https://json-schema.org/draft/2020-12/schema", "2020-12"),
    ],
)
def test_each_supported_dialect_is_honoured(uri: str, dialect: str) -> None:
    assert _compiled({"$schema": uri}).dialect == dialect


def test_a_declared_older_draft_is_read_by_its_own_rules() -> None:
    # Array-form `items` is a tuple in draft-07 and invalid in 2020-12; draft-04's exclusiveMaximum is a flag.
    tuple07 = {"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "string"}]}
    assert _violation(tuple07, [1]) == ("input[0]", '1 is not of type "string"')
    assert _violation(tuple07, ["a", 1]) is None
    with pytest.raises(SchemaError, match="invalid 2020-12 JSON schema"):
        _compiled({"items": [{"type": "string"}]})
    d4 = {"$schema": "http://json-schema.org/draft-04/schema#", "maximum": 5, "exclusiveMaximum": True}
    assert _violation(d4, 5) is not None and _violation(d4, 4) is None
    # 2020-12 $defs is only a keyword there; under draft-07 it is an unknown keyword and a $ref into it is
    # still a plain JSON pointer, so both drafts resolve the same document.
    d7 = {"$schema": "http://json-schema.org/draft-07/schema#", "dependencies": {"a": ["b"]}}
    assert _violation(d7, {"a": 1}) is not None


@pytest.mark.parametrize(
    "uri", ["https://json-schema.org/draft/2030-01/schema", "http://example.com/my-dialect", "draft-07"]
)
def test_an_unknown_dialect_is_refused_with_a_clear_error(uri: str) -> None:
    with pytest.raises(SchemaError, match=r"capability t: unsupported \$schema .*declare one of .*2020-12"):
        compile_schema(json.dumps({"$schema": uri, "type": "object"}), where="capability t")


def test_bad_schemas_and_values_with_no_json_form() -> None:
    with pytest.raises(SchemaError, match="not JSON"):
        compile_schema("{", where="capability t")
    with pytest.raises(SchemaError, match="is an object"):
        compile_schema("[]", where="capability t")
    with pytest.raises(SchemaError, match=r"\$schema must be a URI"):
        compile_schema('{"$schema": 7}', where="capability t")
    with pytest.raises(SchemaError, match="invalid 2020-12"):
        compile_schema('{"type": "strin"}', where="capability t")
    with pytest.raises(SchemaError, match="invalid 2020-12"):  # remote references are never fetched
        compile_schema('{"$ref": "https://example.com/s.json"}', where="capability t")
    assert compile_schema("", where="capability t") is None
    schema = _compiled({"type": "object"})
    lone = _violation({"properties": {"s": {"type": "integer"}}}, {"s": "\ud800"})
    assert lone is not None and lone[0] == "input" and "not valid JSON data" in lone[1]
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(SchemaMismatchError, match="nested too deeply"):
        schema.check(deep, root="output")


def test_an_sdk_capability_with_an_unknown_dialect_fails_at_import() -> None:
    with pytest.raises(SchemaError, match=r"output: unsupported \$schema"):

        class _Bad(Agent):
            name = "bad"

            @capability(output_schema={"$schema": "https://example.com/mine"})
            async def go(self, x: str) -> str:
                return x

    with pytest.raises(SchemaError, match=r"input: unsupported \$schema"):

        class _Bad2(Agent):
            name = "bad2"

            @capability(input_schema={"$schema": "https://example.com/mine"})
            async def go(self, x: str) -> str:
                return x
