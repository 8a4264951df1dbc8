"""`CompiledSchema.check` on a failing value: every bad field (one entry a field, the first first), bounded in the
fields listed and in the size of value searched, and a message naming the first and how many more."""

from __future__ import annotations

import json
import time

import pytest

from hivemesh.mesh.errors import MAX_DETAIL_ENTRIES, InvalidInputError, from_status_parts, to_status
from hivemesh.mesh.schema import MAX_VIOLATIONS, SEARCHED_VALUES, SchemaMismatchError, compile_schema

_ITEMS = compile_schema(json.dumps({"type": "array", "items": {"type": "integer"}}), where="t")


def _mismatch(value: object, root: str = "input") -> SchemaMismatchError:
    assert _ITEMS is not None
    with pytest.raises(SchemaMismatchError) as bad:
        _ITEMS.check(value, root=root)
    return bad.value


def test_one_bad_field_reads_as_before() -> None:
    bad = _mismatch([1, "a", 3])
    assert (bad.path, bad.message, bad.violations, bad.more) == (
        "input[1]", '"a" is not of type "integer"', {"input[1]": '"a" is not of type "integer"'}, 0)
    assert str(bad) == 'input[1]: "a" is not of type "integer"'


def test_past_the_bound_the_fields_listed_stop_and_the_message_says_how_many_more() -> None:
    bad = _mismatch(["a"] * 30, root="output")
    assert list(bad.violations) == [f"output[{i}]" for i in range(MAX_VIOLATIONS)]
    assert bad.more == 29
    assert str(bad) == f'output[0]: "a" is not of type "integer" (and 29 more bad fields; the first {MAX_VIOLATIONS} ' \
                       "are listed)"
    # Every one listed travels in the status's BadRequest, and back.
    status = to_status(InvalidInputError(str(bad), field_violations=bad.violations))
    assert from_status_parts(status.code, status.details, status.trailing_metadata).field_violations == bad.violations


def test_one_entry_a_field_with_every_rule_it_breaks() -> None:
    schema = compile_schema(json.dumps({"type": "object", "required": ["id", "name"], "properties": {
        "sku": {"type": "string", "minLength": 5, "pattern": "^[A-Z]+$"}, "qty": {"minimum": 1}}}), where="t")
    assert schema is not None
    with pytest.raises(SchemaMismatchError) as bad:
        schema.check({"sku": "ab", "qty": 0})
    assert bad.value.violations == {
        "input": "\"id\" is a required property; \"name\" is a required property",
        "input.sku": '"ab" is shorter than 5 characters; "ab" does not match "^[A-Z]+$"',
        "input.qty": "0 is less than the minimum of 1",
    }, bad.value.violations
    assert bad.value.more == 2 and str(bad.value) == 'input: "id" is a required property (and 2 more bad fields)'
    assert MAX_VIOLATIONS == MAX_DETAIL_ENTRIES  # every field listed travels in the status


def test_a_large_failing_value_is_not_searched_past_its_first_bad_field() -> None:
    """jsonschema-rs collects every error at once: 200,000 bad items took 3 s where the first takes microseconds."""
    started = time.perf_counter()
    bad = _mismatch(["a"] * 200_000)
    assert time.perf_counter() - started < 0.5
    assert bad.violations == {"input[0]": '"a" is not of type "integer"'}
    assert f"over {SEARCHED_VALUES} JSON values is not searched for more" in str(bad)
    edge = _mismatch(["a"] * (SEARCHED_VALUES - 1))  # the array and its items: SEARCHED_VALUES values, searched
    assert edge.more == SEARCHED_VALUES - 2
