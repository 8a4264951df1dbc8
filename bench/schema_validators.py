"""Which JSON Schema validator the call path should use: jsonschema-rs vs jsonschema vs fastjsonschema, same run.

The work measured is the input guard's per call: an already-compiled validator checking an already-decoded
JSON value that matches (the common case) against a typical capability schema (an order: nested objects, an
array of line items, enums, patterns, bounds). Two sizes: a typical ~200 B input and a ~64 KiB one (hundreds
of line items). Rounds alternate between the validators so drift hits all of them; the median per call is
reported with its ratio to the fastest. A mismatching input is timed too (the refusal path builds an error).

fastjsonschema implements draft-04/06/07 only, so the schema here sticks to keywords every draft shares.

    .venv/bin/python bench/schema_validators.py              # ~20 s on 2 cores
    .venv/bin/python bench/schema_validators.py --rounds 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import fastjsonschema
import jsonschema
import jsonschema_rs

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["customer", "items"],
    "additionalProperties": False,
    "properties": {
        "customer": {
            "type": "object",
            "required": ["id", "tier"],
            "properties": {
                "id": {"type": "string", "pattern": "^c-[0-9a-f]{6}$"},
                "tier": {"enum": ["free", "pro", "enterprise"]},
            },
        },
        "currency": {"type": "string", "minLength": 3, "maxLength": 3},
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["sku", "qty"],
                "properties": {
                    "sku": {"type": "string", "maxLength": 32},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "note": {"type": "string", "maxLength": 500},
                },
            },
        },
    },
}


def _value(target_bytes: int) -> Any:
    items: list[dict[str, Any]] = []
    value = {"customer": {"id": "c-0a1b2c", "tier": "pro"}, "currency": "EUR", "items": items}
    while len(json.dumps(value)) < target_bytes:
        items.append({"sku": f"SKU-{len(items):05d}", "qty": 1 + len(items) % 9, "note": "gift wrap"})
    return value


def _validators() -> dict[str, Callable[[Any], Any]]:
    rs = jsonschema_rs.Draft202012Validator(SCHEMA, offline=True)
    py = jsonschema.Draft202012Validator(SCHEMA)
    fast = fastjsonschema.compile(SCHEMA)
    return {"jsonschema-rs": rs.validate, "jsonschema": py.validate, "fastjsonschema": fast}


def _per_call(fn: Callable[[Any], Any], value: Any, n: int, *, fails: bool) -> float:
    start = time.perf_counter()
    for _ in range(n):
        try:
            fn(value)
        except Exception:
            if not fails:
                raise
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    validators = _validators()
    bad = _value(200)
    bad["items"][0]["qty"] = 0
    cases = [("200 B, valid", _value(200), 2000, False), ("64 KiB, valid", _value(64 * 1024), 20, False),
             ("200 B, refused", bad, 2000, True)]
    for label, value, n, fails in cases:
        times: dict[str, list[float]] = {name: [] for name in validators}
        for _ in range(args.rounds):
            for name, fn in validators.items():
                fn_n = max(1, n // 20) if name == "jsonschema" else n  # the slow one gets fewer calls per round
                times[name].append(_per_call(fn, value, fn_n, fails=fails))
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        best = min(medians.values())
        size = len(json.dumps(value))
        print(f"{label} ({size} bytes):")  # noqa: T201
        for name, t in sorted(medians.items(), key=lambda kv: kv[1]):
            print(f"  {name:15s} {t * 1e6:10.2f} us/call  x{t / best:6.1f}")  # noqa: T201


if __name__ == "__main__":
    main()
