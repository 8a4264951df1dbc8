"""The document-pipeline reference agents, unit level: each agent called directly (no mesh), and the
plain-gRPC validator over a real grpc.aio server and channel on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import fastjsonschema
import grpc
import pytest

from hivemesh.agents import _font, _render, _samples
from hivemesh.agents._ocr_engine import MAX_SIDE, PgmError, decode_pgm, recognize
from hivemesh.agents.extract import ExtractorAgent, extract_fields
from hivemesh.agents.ocr import OcrAgent
from hivemesh.agents.store import DB_ENV, StorageAgent, default_db_path
from hivemesh.agents.validate_plain import CHECKS, start_server, validate_document
from hivemesh.mesh.errors import NotFoundError
from hivemesh.sdk import Context, InvalidInputError
from hivemesh.v1 import agent_pb2, agent_pb2_grpc

SAMPLES = _samples.list_samples()
REPO = Path(__file__).resolve().parents[2]

EXPECTED: dict[str, dict[str, Any]] = {
    "invoice-001": {
        "document_type": "invoice", "invoice_number": "INV-2024-001", "date": "2024-03-15",
        "vendor": "ACME Tools Inc.", "currency": "USD", "subtotal": 134.99, "tax": 10.80, "total": 145.79,
        "line_items": [
            {"description": "Hex bolts M8", "quantity": 100.0, "unit_price": 0.25, "amount": 25.0},
            {"description": "Steel washers", "quantity": 200.0, "unit_price": 0.10, "amount": 20.0},
            {"description": "Torque wrench", "quantity": 1.0, "unit_price": 89.99, "amount": 89.99},
        ],
    },
    "receipt-002": {
        "document_type": "receipt", "invoice_number": "R-5531", "date": "2024-03-22",
        "vendor": "CORNER CAFE", "currency": "USD", "subtotal": 15.35, "tax": 1.23, "total": 16.58,
        "line_items": [
            {"description": "Latte", "quantity": 2.0, "unit_price": 4.50, "amount": 9.0},
            {"description": "Bagel", "quantity": 1.0, "unit_price": 2.75, "amount": 2.75},
            {"description": "Cookie", "quantity": 3.0, "unit_price": 1.20, "amount": 3.60},
        ],
    },
    "invoice-003": {
        "document_type": "invoice", "invoice_number": "2024/0457", "date": "2024-04-05",
        "vendor": "Nordlicht Design GmbH", "currency": "EUR", "subtotal": 2300.0, "tax": 437.0, "total": 2737.0,
        "line_items": [
            {"description": "Logo design", "quantity": 1.0, "unit_price": 1250.0, "amount": 1250.0},
            {"description": "Brand guide", "quantity": 1.0, "unit_price": 480.0, "amount": 480.0},
            {"description": "Workshop hours", "quantity": 6.0, "unit_price": 95.0, "amount": 570.0},
        ],
    },
    "invoice-004": {
        "document_type": "invoice", "invoice_number": "BO-7781", "date": "2024-02-29",
        "vendor": "Bright Office Supply Co.", "currency": "USD", "subtotal": 170.0, "tax": 8.50, "total": 178.50,
        "line_items": [
            {"description": "Printer paper", "quantity": 10.0, "unit_price": 4.99, "amount": 49.90},
            {"description": "Ink cartridge", "quantity": 4.0, "unit_price": 24.50, "amount": 98.0},
            {"description": "Stapler", "quantity": 2.0, "unit_price": 6.05, "amount": 12.10},
        ],
    },
    "receipt-005": {
        "document_type": "receipt", "invoice_number": None, "date": None,
        "vendor": "QUICK MART #12", "currency": "USD", "subtotal": 7.19, "tax": 0.0, "total": 7.19,
        "line_items": [
            {"description": "Milk 1L", "quantity": 1.0, "unit_price": 2.49, "amount": 2.49},
            {"description": "Bread", "quantity": 1.0, "unit_price": 3.10, "amount": 3.10},
            {"description": "Apple", "quantity": 2.0, "unit_price": 0.80, "amount": 1.60},
        ],
    },
}
# The deliberately invalid samples and the field validation must name.
BAD_FIELD = {"invoice-004": "subtotal", "receipt-005": "date"}


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _ctx(key: str = "", capability: str = "store") -> Context:
    return Context(
        capability=capability,
        caller="spiffe://hivemesh.local/client/tests",
        call=agent_pb2.CallContext(call_id="call-1", idempotency_key=key),
    )


def _violations(exc: pytest.ExceptionInfo[InvalidInputError]) -> dict[str, str]:
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return exc.value.field_violations


# --- samples and renderer -------------------------------------------------------------------------------------


def test_samples_are_shipped_small_and_valid_as_declared() -> None:
    assert SAMPLES == ["invoice-001", "receipt-002", "invoice-003", "invoice-004", "receipt-005"]
    assert set(EXPECTED) == set(SAMPLES)
    assert {s.name for s in _samples.SAMPLES if not s.valid} == set(BAD_FIELD)
    for name in SAMPLES:
        image = _samples.sample_image(name)
        assert image.startswith(b"P5") and len(image) < 200 * 1024, name
        assert _samples.sample_text(name).strip(), name


@pytest.mark.parametrize("name", SAMPLES)
def test_renderer_regenerates_identical_bytes(name: str) -> None:
    spec = _samples.sample_spec(name)
    fresh = _render.render_sample(spec)
    assert fresh == _samples.sample_image(name), f"{name}.pgm is stale: python -m hivemesh.agents._render"
    # The seed matters (the noise is real), and rendering twice is stable.
    other = _render.render_text(_samples.sample_text(name), scale=spec.scale, seed=spec.seed + 1, label=name)
    assert other != fresh and len(other) == len(fresh)
    assert _render.render_sample(spec) == fresh


def test_render_check_cli_passes_on_committed_files() -> None:
    assert _render.main(["--check"]) == 0


def test_render_refuses_what_it_cannot_draw() -> None:
    with pytest.raises(ValueError, match="not in the font"):
        _render.render_text("price: 5€", scale=2, seed=1)
    with pytest.raises(ValueError, match="scale"):
        _render.render_text("ok", scale=1, seed=1)


def test_font_glyphs_are_far_enough_apart_to_survive_noise() -> None:
    distance, a, b = _font.min_pairwise_distance()
    assert distance >= _font.MIN_DISTANCE, (a, b)
    for ch in ".,:-/$#@":
        assert ch in _font.GLYPHS
    assert set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz") <= set(_font.GLYPHS)


# --- OCR --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
async def test_ocr_reads_every_sample(name: str) -> None:
    source = _samples.sample_text(name).rstrip("\n")
    out = await OcrAgent().ocr({"sample": name})
    accuracy = 1 - _edit_distance(out["text"], source) / len(source)
    assert accuracy >= 0.98, (name, accuracy, out["text"])
    assert 0.9 <= out["confidence"] <= 1.0
    assert out["scale"] == _samples.sample_spec(name).scale
    assert [ln["text"] for ln in out["lines"]] == [ln for ln in source.split("\n") if ln.strip()]
    # The same scan sent as bytes reads the same.
    image_b64 = base64.b64encode(_samples.sample_image(name)).decode()
    assert await OcrAgent().ocr({"image_b64": image_b64, "format": "pgm"}) == out


def test_ocr_engine_reads_unseen_text_at_every_scale() -> None:
    text = "Order #A-17 @ 12:30\n  indented $1,234.56\n\nmixed Case & (parens) 99%\n--------\nend."
    for scale in (2, 3, 4):
        image = decode_pgm(_render.render_text(text, scale=scale, seed=scale, label="unseen"))
        assert recognize(image).text == text, scale


def test_ocr_engine_reads_long_x_height_lines_despite_stroke_specks() -> None:
    # Long lines of short letters: a speck touching a stroke survives erosion and stretches the line's band
    # by a row, so the cell top must be searched with slack (this failed before the slack existed).
    text = "ID 7\n" + "\n".join(["acemnorsuvwxz" * 26] * 8)
    image = decode_pgm(_render.render_text(text, scale=2, seed=1, label="lower"))
    assert recognize(image).text == text


def test_pgm_decoder_accepts_comments_and_rescales_maxval() -> None:
    image = decode_pgm(b"P5\n# a comment\n3 # another\n2\n15\n" + bytes([0, 15, 7, 15, 0, 15]))
    assert (image.width, image.height) == (3, 2)
    assert image.pixels == bytes([0, 255, 119, 255, 0, 255])


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"P2\n2 2\n255\n0 0 0 0", "P5"),
        (b"\x89PNG\r\n\x1a\n....", "P5"),
        (b"P5\n2 2\n255\n\x00\x00\x00", "truncated"),
        (b"P5\n2 2\n255\n\x00\x00\x00\x00\x00", "unexpected bytes"),
        (b"P5\n2 x\n255\n\x00\x00\x00\x00", "integers"),
        (b"P5\n2 2\n65535\n" + b"\x00" * 8, "8-bit"),
        (b"P5\n0 2\n255\n", "at least 1x1"),
        (f"P5\n{MAX_SIDE + 1} 10\n255\n".encode(), "too large"),
        (b"P5\n4000 4000\n255\n", "too large"),
        (b"P5\n2 2", "truncated"),
    ],
)
def test_pgm_decoder_refuses_bad_images(data: bytes, why: str) -> None:
    with pytest.raises(PgmError, match=why):
        decode_pgm(data)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"image_b64": "not base64!!", "format": "pgm"}, "input.image_b64"),
        ({"image_b64": base64.b64encode(b"P2\n1 1\n255\n0").decode()}, "input.image_b64"),
        ({"image_b64": base64.b64encode(b"P5\n9000 9000\n255\n").decode()}, "input.image_b64"),
        ({"image_b64": 42}, "input.image_b64"),
        ({"image_b64": "AAAA", "format": "png"}, "input.format"),
        ({"sample": "../../etc/passwd"}, "input.sample"),
        ({"sample": "invoice-001", "image_b64": "AAAA"}, "input"),
        ({}, "input"),
        ({"sample": "invoice-001", "colour": True}, "input.colour"),
    ],
)
async def test_ocr_refuses_bad_input_naming_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInputError) as exc:
        await OcrAgent().ocr(payload)  # type: ignore[arg-type]
    assert field in _violations(exc), exc.value.field_violations


def test_ocr_schema_lets_the_mesh_refuse_early() -> None:
    spec = OcrAgent().capabilities["ocr"]
    validate = fastjsonschema.compile(dict(spec.input_schema))
    validate({"sample": "invoice-001"})
    validate({"image_b64": "AAAA", "format": "pgm"})
    for bad in ({"sample": "nope"}, {}, {"sample": "invoice-001", "image_b64": "AAAA"}, {"image_b64": "A", "x": 1}):
        with pytest.raises(fastjsonschema.JsonSchemaValueException):
            validate(bad)


# --- extraction -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
async def test_extraction_of_each_sample_gives_the_expected_fields(name: str) -> None:
    text = (await OcrAgent().ocr({"sample": name}))["text"]
    fields = await ExtractorAgent().extract({"text": text})
    assert fields == EXPECTED[name]
    assert extract_fields(_samples.sample_text(name)) == EXPECTED[name]


def test_extraction_rules_on_other_layouts() -> None:
    fields = extract_fields(
        "Receipt\nMerchant: Bean There\nMar 7, 2024\n1 x Tea @ 2.00  2.00\nTip  1.00\nTotal EUR  2.00\n"
    )
    assert fields["vendor"] == "Bean There"
    assert fields["date"] == "2024-03-07"
    assert fields["currency"] == "EUR"
    assert fields["line_items"] == [{"description": "Tea", "quantity": 1.0, "unit_price": 2.0, "amount": 2.0}]
    assert fields["total"] == 2.0 and fields["subtotal"] is None
    # An impossible date is reported as written (ISO), for the validator to flag.
    assert extract_fields("INVOICE\nDate: 02/30/2024")["date"] == "2024-02-30"
    assert extract_fields("hello world")["document_type"] == "unknown"


@pytest.mark.parametrize(
    ("payload", "field"),
    [({}, "input.text"), ({"text": 3}, "input.text"), ({"text": "x", "lang": "de"}, "input.lang"),
     ({"text": "x" * 200_001}, "input.text")],
)
async def test_extraction_refuses_bad_input_naming_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInputError) as exc:
        await ExtractorAgent().extract(payload)  # type: ignore[arg-type]
    assert field in _violations(exc)


# --- validation (pure) ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_validation_passes_good_samples_and_names_the_bad_field(name: str) -> None:
    result = validate_document(EXPECTED[name])
    assert result["document"] == EXPECTED[name]
    if name in BAD_FIELD:
        assert not result["valid"]
        assert [e["field"] for e in result["errors"]] == [BAD_FIELD[name]]
    else:
        assert result == {"valid": True, "errors": [], "document": EXPECTED[name]}


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(EXPECTED["invoice-001"]))
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("doc", "fields"),
    [
        (_doc(line_items=[{"description": "x", "quantity": 3, "unit_price": 1.5, "amount": 4.0}],
              subtotal=4.0, tax=0.0, total=4.0), ["line_items[0].amount"]),
        (_doc(total=150.0), ["total"]),
        (_doc(date="2024-02-30"), ["date"]),
        (_doc(date="15/03/2024"), ["date"]),
        (_doc(invoice_number=None, vendor=""), ["vendor", "invoice_number"]),
        (_doc(document_type="unknown"), ["document_type"]),
        (_doc(total="145.79"), ["total"]),
        (_doc(line_items=[]), ["line_items"]),
        (_doc(line_items=[{"description": "x", "quantity": None, "unit_price": 1.0, "amount": 1.0}],
              subtotal=1.0, tax=None, total=1.0), ["line_items[0].quantity"]),
        (_doc(subtotal=134.995, total=145.795), []),  # within ±0.01
    ],
)
def test_validation_checks_name_the_failing_field(doc: dict[str, Any], fields: list[str]) -> None:
    result = validate_document(doc)
    assert [e["field"] for e in result["errors"]] == fields
    assert result["valid"] is (not fields)


# --- validate_plain over real gRPC ----------------------------------------------------------------------------------


@pytest.fixture
async def validator() -> AsyncIterator[agent_pb2_grpc.AgentAsyncStub]:
    server, port = await start_server("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield agent_pb2_grpc.AgentStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


def _invoke(doc: Any, capability: str = "validate") -> agent_pb2.InvokeRequest:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return agent_pb2.InvokeRequest(capability=capability, input=data, content_type="application/json")


async def test_validator_describe_returns_its_card(validator: agent_pb2_grpc.AgentAsyncStub) -> None:
    card = await validator.Describe(agent_pb2.DescribeRequest(), timeout=5)
    assert card.name == "validator" and card.owner == "documents"
    assert [c.name for c in card.capabilities] == ["validate"]
    cap = card.capabilities[0]
    assert cap.idempotent and "documents" in cap.tags
    check = fastjsonschema.compile(json.loads(cap.input_schema))
    check(EXPECTED["receipt-005"])  # missing fields must reach the validator, not be refused by the mesh
    with pytest.raises(fastjsonschema.JsonSchemaValueException):
        check({"total": "ten"})


@pytest.mark.parametrize("name", SAMPLES)
async def test_validator_invoke_over_grpc(validator: agent_pb2_grpc.AgentAsyncStub, name: str) -> None:
    resp = await validator.Invoke(_invoke(EXPECTED[name]), timeout=5)
    assert resp.state == agent_pb2.TASK_STATE_COMPLETED and resp.content_type == "application/json"
    out = json.loads(resp.output)
    assert out["document"] == EXPECTED[name]
    assert out["valid"] is (name not in BAD_FIELD)
    assert [e["field"] for e in out["errors"]] == ([BAD_FIELD[name]] if name in BAD_FIELD else [])


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (_invoke(b"{not json"), grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
        (_invoke(b"\xff\xfe"), grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
        (_invoke(b'{"total": NaN}'), grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
        (_invoke([1, 2]), grpc.StatusCode.INVALID_ARGUMENT, "JSON object"),
        (_invoke({}, capability="extract"), grpc.StatusCode.NOT_FOUND, "no capability"),
        (agent_pb2.InvokeRequest(capability="validate", input=b"{}", content_type="text/csv"),
         grpc.StatusCode.INVALID_ARGUMENT, "content type"),
    ],
)
async def test_validator_refuses_malformed_input(
    validator: agent_pb2_grpc.AgentAsyncStub, request_: agent_pb2.InvokeRequest, code: grpc.StatusCode, text: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await validator.Invoke(request_, timeout=5)
    assert exc.value.code() == code
    assert text in (exc.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in validator.InvokeStream(request_, timeout=5):
            pass
    assert streamed.value.code() == code


async def test_validator_stream_sends_one_chunk_per_check_then_final(validator: agent_pb2_grpc.AgentAsyncStub) -> None:
    chunks = [c async for c in validator.InvokeStream(_invoke(EXPECTED["invoice-004"]), timeout=5)]
    assert len(chunks) == len(CHECKS) + 1
    *checks, final = chunks
    assert [json.loads(c.data)["check"] for c in checks] == list(CHECKS)
    assert all(not c.final and c.state == agent_pb2.TASK_STATE_WORKING for c in checks)
    status = {json.loads(c.data)["check"]: json.loads(c.data)["status"] for c in checks}
    assert status == {"required": "passed", "line_items": "passed", "subtotal": "failed", "total": "passed",
                      "date": "passed"}
    assert final.final and final.state == agent_pb2.TASK_STATE_COMPLETED
    assert json.loads(final.data) == validate_document(EXPECTED["invoice-004"])


async def _read_line(stream: asyncio.StreamReader, timeout: float) -> str:
    return (await asyncio.wait_for(stream.readline(), timeout)).decode().strip()


async def test_validator_process_serves_plaintext_on_loopback_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hivemesh.agents.validate_plain", "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await _read_line(proc.stdout, 20)  # type: ignore[arg-type]
        assert line.startswith("listening 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            out = await agent_pb2_grpc.AgentStub(channel).Invoke(_invoke(EXPECTED["invoice-001"]), timeout=5)
            assert json.loads(out.output)["valid"] is True
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_validator_process_refuses_non_loopback_listen() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hivemesh.agents.validate_plain", "--listen", "0.0.0.0:7001",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 2
        assert b"127.0.0.1 only" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_validator_loads_no_hivemesh_runtime() -> None:
    code = (
        "import sys, hivemesh.agents.validate_plain, hivemesh.agents.run; "
        "print(','.join(sorted(m for m in sys.modules if m.startswith('hivemesh'))))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    # hivemesh.mesh (an __init__ that imports nothing) and hivemesh.mesh.lazy (standard library only) are what
    # the agents package needs to name its exports lazily; nothing of the mesh's runtime loads.
    assert out.decode().strip().split(",") == [
        "hivemesh", "hivemesh.agents", "hivemesh.agents.run", "hivemesh.agents.validate_plain",
        "hivemesh.mesh", "hivemesh.mesh.lazy",
        "hivemesh.v1", "hivemesh.v1.agent_pb2", "hivemesh.v1.agent_pb2_grpc",
    ]


async def test_run_entry_point_needs_a_mesh_location(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    env["HIVEMESH_HOME"] = str(tmp_path)  # an empty state folder: no `hivemesh up` state file
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hivemesh.agents.run", "extractor", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"mesh location unknown" in err
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hivemesh.agents", "nope", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2 and b"invalid choice" in err


# --- storage ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def storage(tmp_path: Path) -> StorageAgent:
    return StorageAgent(tmp_path / "docs.db")


async def test_storage_stores_dedups_and_reads_back(storage: StorageAgent) -> None:
    await storage.on_start()
    result = validate_document(EXPECTED["invoice-001"])
    first = await storage.store(result, _ctx("key-1"))  # type: ignore[arg-type]
    assert first["status"] == "stored" and first["id"] >= 1
    again = await storage.store(result, _ctx("key-1"))  # type: ignore[arg-type]
    assert again == {"id": first["id"], "status": "duplicate"}
    other = await storage.store(validate_document(EXPECTED["receipt-002"]), _ctx("key-2"))  # type: ignore[arg-type]
    assert other["status"] == "stored" and other["id"] != first["id"]
    # No key: every call is a new document.
    a = await storage.store(result, _ctx())  # type: ignore[arg-type]
    b = await storage.store(result, _ctx())  # type: ignore[arg-type]
    assert a["id"] != b["id"]

    stored = await storage.get({"id": first["id"]})
    assert stored["status"] == "stored" and stored["document"] == EXPECTED["invoice-001"]
    assert stored["errors"] == [] and stored["idempotency_key"] == "key-1"
    assert stored["line_items"] == EXPECTED["invoice-001"]["line_items"]
    with closing(sqlite3.connect(storage.db_path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM documents").fetchone() == (4,)
        assert conn.execute("SELECT COUNT(*) FROM line_items WHERE document_id = ?", (first["id"],)).fetchone() == (3,)
        assert conn.execute("SELECT total, currency FROM documents WHERE id = ?", (first["id"],)).fetchone() == (
            145.79, "USD")


async def test_storage_keeps_invalid_documents_flagged_rejected(storage: StorageAgent) -> None:
    result = validate_document(EXPECTED["invoice-004"])
    out = await storage.store(result, _ctx("bad-1"))  # type: ignore[arg-type]
    assert out["status"] == "rejected"
    stored = await storage.get({"id": out["id"]})
    assert stored["status"] == "rejected"
    assert [e["field"] for e in stored["errors"]] == ["subtotal"]
    # A rejected document with mistyped fields is still kept (as received), with NULL columns.
    weird = {"valid": False, "document": {"total": "lots", "line_items": "none"},
             "errors": [{"field": "total", "message": "must be a number"}]}
    kept = await storage.store(weird, _ctx())  # type: ignore[arg-type]
    assert (await storage.get({"id": kept["id"]}))["document"] == weird["document"]


async def test_storage_same_key_for_another_document_is_refused(storage: StorageAgent) -> None:
    await storage.store(validate_document(EXPECTED["invoice-001"]), _ctx("k"))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError) as exc:
        await storage.store(validate_document(EXPECTED["invoice-003"]), _ctx("k"))  # type: ignore[arg-type]
    assert "context.idempotency_key" in _violations(exc)


async def test_storage_replicas_sharing_a_file_store_a_key_once(tmp_path: Path) -> None:
    replicas = [StorageAgent(tmp_path / "shared.db") for _ in range(3)]
    result = validate_document(EXPECTED["receipt-002"])
    outs = await asyncio.gather(*(replicas[i % 3].store(result, _ctx("same")) for i in range(12)))  # type: ignore[arg-type]
    assert sorted(o["status"] for o in outs) == ["duplicate"] * 11 + ["stored"]
    assert len({o["id"] for o in outs}) == 1
    with closing(sqlite3.connect(tmp_path / "shared.db")) as conn:
        assert conn.execute("SELECT COUNT(*) FROM documents").fetchone() == (1,)
        assert conn.execute("SELECT COUNT(*) FROM line_items").fetchone() == (3,)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ([], "input"),
        ({"document": {}, "errors": []}, "input.valid"),
        ({"valid": "yes", "document": {}, "errors": []}, "input.valid"),
        ({"valid": True, "document": [], "errors": []}, "input.document"),
        ({"valid": True, "document": {}, "errors": "none"}, "input.errors"),
        ({"valid": False, "document": {}, "errors": [{"field": 1}]}, "input.errors[0]"),
        ({"valid": True, "document": {}, "errors": [{"field": "x", "message": "y"}]}, "input.errors"),
        ({"valid": False, "document": {}, "errors": []}, "input.errors"),
        ({"valid": True, "document": {}, "errors": [], "extra": 1}, "input.extra"),
        ({"valid": True, "document": {"total": "ten"}, "errors": []}, "input.document.total"),
        ({"valid": True, "document": {"line_items": [{"amount": "1"}]}, "errors": []},
         "input.document.line_items[0].amount"),
    ],
)
async def test_storage_refuses_bad_input_and_writes_nothing(
    storage: StorageAgent, payload: Any, field: str
) -> None:
    with pytest.raises(InvalidInputError) as exc:
        await storage.store(payload, _ctx("k"))
    assert field in _violations(exc), exc.value.field_violations
    if storage.db_path.exists():
        with closing(sqlite3.connect(storage.db_path)) as conn:
            assert conn.execute("SELECT COUNT(*) FROM documents").fetchone() == (0,)


async def test_storage_get_refuses_bad_ids(storage: StorageAgent) -> None:
    for bad in ({}, {"id": "1"}, {"id": 0}, {"id": True}):
        with pytest.raises(InvalidInputError) as exc:
            await storage.get(bad)  # type: ignore[arg-type]
        assert "input.id" in _violations(exc)
    with pytest.raises(NotFoundError) as missing:
        await storage.get({"id": 99})
    assert missing.value.code == grpc.StatusCode.NOT_FOUND


def test_storage_database_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DB_ENV, str(tmp_path / "x.db"))
    assert default_db_path() == tmp_path / "x.db"
    assert StorageAgent().db_path == tmp_path / "x.db"
    monkeypatch.delenv(DB_ENV)
    monkeypatch.setenv("HIVEMESH_HOME", str(tmp_path / "home"))
    assert default_db_path() == (tmp_path / "home" / "documents.db").resolve()


def test_package_exports_resolve() -> None:
    import hivemesh.agents as agents

    for name in agents.__all__:
        assert getattr(agents, name) is not None
    with pytest.raises(AttributeError):
        agents.NoSuchAgent  # noqa: B018
