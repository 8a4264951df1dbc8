"""The validation agent, written the way an agent in any other language is: a plain gRPC server.

Nothing from the hivemesh runtime is on its serving path: it imports only `grpc`, the generated
`hivemesh.v1` stubs and the standard library, serves `hivemesh.v1.Agent` in plaintext on loopback, and
leaves mutual TLS, tokens, policy and registration to a sidecar in front of it:

    python -m hivemesh.agents.validate_plain --listen 127.0.0.1:7001     # prints "listening 127.0.0.1:7001"
    hivemesh sidecar --agent 127.0.0.1:7001 --mesh-socket /run/validator/mesh.sock ...

It calls no other capability; an agent that does dials the sidecar's `Mesh` service on that Unix socket
(`grpc.aio.insecure_channel("unix:/run/validator/mesh.sock")`, the same address string in grpc-js or grpc-go),
which only the sidecar's user can open.

A Go or Rust agent would do exactly this with its own generated stubs, which is the point of the sample.
`validate` checks an extracted invoice/receipt: required fields present, each line item's amount equals
quantity × unit price, the subtotal equals the sum of the amounts, the total equals subtotal + tax, and
the date is a real calendar date (all within ±0.01). A failing check is a normal answer
(`valid: false` with one error per problem, naming the field), not an RPC error; only input that is not a
JSON object at all is refused with INVALID_ARGUMENT.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import math
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from hivemesh.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

AGENT_NAME = "validator"
CAPABILITY = "validate"
TOLERANCE = 0.01
"""Largest accepted difference between a printed amount and the one computed from the others."""
CHECKS = ("required", "line_items", "subtotal", "total", "date")
"""Check names, in the order they run and stream."""
DEFAULT_LISTEN = "127.0.0.1:7001"
_JSON = "application/json"
_EPSILON = 1e-9  # float noise: 0.1 * 3 is 0.30000000000000004

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STRING_OR_NULL = {"type": ["string", "null"]}
# Hand-written, as an agent in another language would ship it. Deliberately permissive about missing
# fields: reporting them is this agent's job, so the mesh's input guard must let such documents through.
INPUT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Extracted invoice or receipt fields",
    "type": "object",
    "properties": {
        "document_type": _STRING_OR_NULL,
        "invoice_number": _STRING_OR_NULL,
        "date": _STRING_OR_NULL,
        "vendor": _STRING_OR_NULL,
        "currency": _STRING_OR_NULL,
        "subtotal": _NUMBER_OR_NULL,
        "tax": _NUMBER_OR_NULL,
        "total": _NUMBER_OR_NULL,
        "line_items": {
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "properties": {
                    "description": _STRING_OR_NULL,
                    "quantity": _NUMBER_OR_NULL,
                    "unit_price": _NUMBER_OR_NULL,
                    "amount": _NUMBER_OR_NULL,
                },
            },
        },
    },
}
OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "valid": {"type": "boolean"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                "required": ["field", "message"],
            },
        },
        "document": {"type": "object"},
    },
    "required": ["valid", "errors", "document"],
}

Errors = list[dict[str, str]]


def agent_card() -> agent_pb2.AgentCard:
    """The card Describe returns (and the sidecar publishes in the registry)."""
    return agent_pb2.AgentCard(
        name=AGENT_NAME,
        version="1.0.0",
        description="Validates extracted invoices and receipts: required fields, line arithmetic, totals, date.",
        owner="documents",
        capabilities=[
            agent_pb2.Capability(
                name=CAPABILITY,
                description=(
                    "Check an extracted invoice/receipt → {valid, errors: [{field, message}], document}. "
                    "InvokeStream streams one chunk per check, then a final chunk with the verdict."
                ),
                input_schema=json.dumps(INPUT_SCHEMA, sort_keys=True),
                output_schema=json.dumps(OUTPUT_SCHEMA, sort_keys=True),
                streaming=False,
                tags=["documents", "validation"],
                idempotent=True,
                input_modes=[_JSON],
                output_modes=[_JSON],
            )
        ],
        labels={"language": "python-plain-grpc"},
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _money(value: float) -> str:
    return f"{value:.2f}"


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE + _EPSILON


def _check_required(doc: dict[str, Any]) -> Errors:
    errors: Errors = []
    doc_type = doc.get("document_type")
    if doc_type in (None, ""):
        errors.append({"field": "document_type", "message": "required field is missing"})
    elif doc_type not in ("invoice", "receipt"):
        errors.append({"field": "document_type", "message": f"{str(doc_type)[:40]!r} is not an invoice or a receipt"})
    required_text = ["vendor", "date", "currency"] + (["invoice_number"] if doc_type == "invoice" else [])
    for name in required_text:
        value = doc.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            errors.append({"field": name, "message": "required field is missing"})
        elif not isinstance(value, str):
            errors.append({"field": name, "message": "must be a string"})
    for name in ("subtotal", "total"):
        value = doc.get(name)
        if value is None:
            errors.append({"field": name, "message": "required field is missing"})
        elif not _is_number(value):
            errors.append({"field": name, "message": "must be a number"})
    tax = doc.get("tax")
    if tax is not None and (not _is_number(tax) or tax < 0):
        errors.append({"field": "tax", "message": "must be a non-negative number when present"})
    items = doc.get("line_items")
    if items is None or items == []:
        errors.append({"field": "line_items", "message": "required field is missing: at least one line item"})
    elif not isinstance(items, list):
        errors.append({"field": "line_items", "message": "must be a list of line items"})
    return errors


def _indexed_items(doc: dict[str, Any]) -> list[tuple[int, dict[str, Any]]] | None:
    items = doc.get("line_items")
    if not isinstance(items, list):
        return None
    return [(i, item) for i, item in enumerate(items)]


def _check_line_items(doc: dict[str, Any]) -> Errors:
    errors: Errors = []
    for i, item in _indexed_items(doc) or []:
        where = f"line_items[{i}]"
        if not isinstance(item, dict):
            errors.append({"field": where, "message": "must be an object"})
            continue
        bad = [k for k in ("quantity", "unit_price", "amount") if not _is_number(item.get(k))]
        for k in bad:
            errors.append({"field": f"{where}.{k}", "message": "must be a number"})
        if bad:
            continue
        qty, price, amount = item["quantity"], item["unit_price"], item["amount"]
        if not _close(qty * price, amount):
            errors.append({
                "field": f"{where}.amount",
                "message": f"{qty:g} x {_money(price)} = {_money(qty * price)}, but the amount is {_money(amount)}",
            })
    return errors


def _number(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def _check_subtotal(doc: dict[str, Any]) -> Errors | None:
    items = _indexed_items(doc)
    subtotal = _number(doc.get("subtotal"))
    if not items or subtotal is None:
        return None
    amounts = [_number(item.get("amount")) if isinstance(item, dict) else None for _, item in items]
    numbers = [a for a in amounts if a is not None]
    if len(numbers) != len(amounts):
        return None
    computed = math.fsum(numbers)
    if _close(computed, subtotal):
        return []
    return [{
        "field": "subtotal",
        "message": f"line items add up to {_money(computed)}, but the subtotal is {_money(subtotal)}",
    }]


def _check_total(doc: dict[str, Any]) -> Errors | None:
    subtotal, total = _number(doc.get("subtotal")), _number(doc.get("total"))
    tax = 0.0 if doc.get("tax") is None else _number(doc.get("tax"))
    if subtotal is None or total is None or tax is None:
        return None
    if _close(subtotal + tax, total):
        return []
    return [{
        "field": "total",
        "message": f"subtotal {_money(subtotal)} + tax {_money(tax)} = {_money(subtotal + tax)}, "
        f"but the total is {_money(total)}",
    }]


def _check_date(doc: dict[str, Any]) -> Errors | None:
    value = doc.get("date")
    if not isinstance(value, str) or not value.strip():
        return None
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return [{"field": "date", "message": f"{value[:40]!r} is not an ISO date (YYYY-MM-DD)"}]
    try:
        datetime.date.fromisoformat(value)
    except ValueError:
        return [{"field": "date", "message": f"{value} is not a valid calendar date"}]
    return []


_CHECK_FUNCS: dict[str, Callable[[dict[str, Any]], Errors | None]] = {
    "required": _check_required,
    "line_items": _check_line_items,
    "subtotal": _check_subtotal,
    "total": _check_total,
    "date": _check_date,
}


def run_checks(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per check, in CHECKS order: {check, status: passed|failed|skipped, errors}.

    A check is skipped when what it needs is missing or mistyped; that is already reported by 'required'
    or 'line_items', so one problem is named once.
    """
    out: list[dict[str, Any]] = []
    for name in CHECKS:
        errors = _CHECK_FUNCS[name](doc)
        status = "skipped" if errors is None else ("failed" if errors else "passed")
        out.append({"check": name, "status": status, "errors": errors or []})
    return out


def verdict(doc: dict[str, Any], checks: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [e for c in checks for e in c["errors"]]
    return {"valid": not errors, "errors": errors, "document": doc}


def validate_document(doc: dict[str, Any]) -> dict[str, Any]:
    """{valid, errors: [{field, message}], document}: the capability's answer for doc."""
    return verdict(doc, run_checks(doc))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class ValidatorServicer(agent_pb2_grpc.AgentServicer):
    """hivemesh.v1.Agent for the validator, straight on the generated stubs."""

    def __init__(self) -> None:
        self._card = agent_card()

    async def Describe(self, request: agent_pb2.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return self._card

    async def _document(self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request.capability != CAPABILITY:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"agent {AGENT_NAME!r} has no capability {request.capability[:64]!r} (it offers {CAPABILITY!r})",
            )
        if request.content_type not in ("", _JSON):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"content type {request.content_type[:64]!r} is not accepted: send {_JSON}",
            )
        try:
            doc = json.loads(request.input, parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"input is not valid JSON: {exc}")
        if not isinstance(doc, dict):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input must be a JSON object (the extracted document fields), not {type(doc).__name__}",
            )
        return doc

    async def Invoke(self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        doc = await self._document(request, context)
        result = validate_document(doc)
        log.debug("validate call %s: valid=%s", request.context.call_id, result["valid"])
        return agent_pb2.InvokeResponse(
            output=json.dumps(result, separators=(",", ":")).encode(),
            content_type=_JSON,
            state=agent_pb2.TASK_STATE_COMPLETED,
        )

    async def Link(self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        """Its sidecar calls it unary (a plain agent need not multiplex on loopback)."""
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the validator serves Invoke, not Link")
        yield  # an async generator, as the method's cardinality asks

    async def InvokeStream(
        self, request: agent_pb2.InvokeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        doc = await self._document(request, context)
        checks = run_checks(doc)
        for check in checks:
            yield agent_pb2.InvokeChunk(
                data=json.dumps(check, separators=(",", ":")).encode(),
                content_type=_JSON,
                state=agent_pb2.TASK_STATE_WORKING,
            )
        yield agent_pb2.InvokeChunk(
            data=json.dumps(verdict(doc, checks), separators=(",", ":")).encode(),
            content_type=_JSON,
            state=agent_pb2.TASK_STATE_COMPLETED,
            final=True,
        )


def parse_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:7001' → ('127.0.0.1', 7001); loopback only, since the sidecar is what faces the network."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen address {value!r} must be 127.0.0.1:<port>")
    if host == "localhost":
        host = "127.0.0.1"
    if host != "127.0.0.1":
        raise ValueError(f"refusing to listen on {host!r}: this agent serves plaintext on 127.0.0.1 only")
    return host, int(port)


async def start_server(host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Start the plaintext validator server; returns it and the bound port (stop it with `server.stop`)."""
    if host != "127.0.0.1":
        raise ValueError("the validator serves plaintext on 127.0.0.1 only")
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServicer_to_server(ValidatorServicer(), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc}") from None
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    return server, bound


async def serve(host: str, port: int, grace: float = 2.0) -> None:
    """Serve until SIGINT or SIGTERM, then finish in-flight calls (up to grace seconds) and return."""
    server, bound = await start_server(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        # The one line a supervisor (test, `hivemesh up`, a shell script) waits for before starting the sidecar.
        sys.stdout.write(f"listening {host}:{bound}\n")
        sys.stdout.flush()
        log.info("validator serving %s on %s:%d (plaintext, loopback only)", CAPABILITY, host, bound)
        await stop.wait()
        log.info("validator stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop(grace)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hivemesh.agents.validate_plain",
        description="The document validation agent as a plain gRPC server (no hivemesh runtime): "
        "serves hivemesh.v1.Agent in plaintext on loopback for a sidecar to front.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--listen", help=f"127.0.0.1:<port> to serve on (default {DEFAULT_LISTEN})")
    where.add_argument("--port", type=int, help="port on 127.0.0.1 (0 = pick a free one)")
    parser.add_argument("--grace", type=float, default=2.0, help="seconds to finish in-flight calls on stop")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    try:
        if args.port is not None:
            host, port = parse_listen(f"127.0.0.1:{args.port}")
        else:
            host, port = parse_listen(args.listen or DEFAULT_LISTEN)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(host, port, args.grace))
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
