"""The storage agent: validated documents into SQLite, exactly once per idempotency key. Last pipeline step.

Invalid documents are stored too, flagged `rejected` with the validator's errors, rather than refused:
a real pipeline quarantines what fails validation for a person to review (and the caller gets an id to
cite in that escalation) instead of dropping it, which would lose the document. Refusals
(InvalidInputError) are kept for input that is not a validation result at all.

Exactly once: a call carrying `ctx.call.idempotency_key` is stored at most once. Retries (by the mesh or
by a workflow re-run) with the same key return the first call's id with status `duplicate`; the same key
with a different payload is refused, since that is a caller bug that would otherwise go unnoticed. Each
store is one `BEGIN IMMEDIATE` transaction and the key column is UNIQUE, so replicas sharing the database
file cannot both insert a key, and a crash mid-store leaves nothing half-written.

The database is `$HIVEMESH_STORE_DB`, else `<$HIVEMESH_HOME or ./.hivemesh>/documents.db`.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Literal, TypedDict

from hivemesh.mesh import json_depth
from hivemesh.mesh.errors import NotFoundError
from hivemesh.mesh.settings import state_dir
from hivemesh.sdk import Agent, Context, InvalidInputError, capability

DB_ENV = "HIVEMESH_STORE_DB"
MAX_LINE_ITEMS = 10_000
_BUSY_TIMEOUT_MS = 5_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    status          TEXT NOT NULL CHECK (status IN ('stored', 'rejected')),
    idempotency_key TEXT UNIQUE,
    payload_sha256  TEXT NOT NULL,
    document_type   TEXT,
    invoice_number  TEXT,
    date            TEXT,
    vendor          TEXT,
    currency        TEXT,
    subtotal        REAL,
    tax             REAL,
    total           REAL,
    errors          TEXT NOT NULL,  -- JSON list of {field, message}
    document        TEXT NOT NULL,  -- the document exactly as received, JSON
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS line_items (
    document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    description TEXT,
    quantity    REAL,
    unit_price  REAL,
    amount      REAL,
    PRIMARY KEY (document_id, position)
);
"""

_TEXT_FIELDS = ("document_type", "invoice_number", "date", "vendor", "currency")
_NUMBER_FIELDS = ("subtotal", "tax", "total")
_ITEM_NUMBERS = ("quantity", "unit_price", "amount")


class ValidationError(TypedDict):
    field: str
    message: str


class _StoreInputRequired(TypedDict):
    valid: bool
    document: dict[str, Any]


class StoreInput(_StoreInputRequired, total=False):
    """The validation agent's answer ({valid, document, errors}); errors may be omitted when valid.

    (Two classes rather than NotRequired: with postponed annotations Python 3.11 cannot see NotRequired.)
    """

    errors: list[ValidationError]


class StoreOutput(TypedDict):
    id: int
    status: Literal["stored", "rejected", "duplicate"]


class GetInput(TypedDict):
    id: int


class StoredLineItem(TypedDict):
    description: str | None
    quantity: float | None
    unit_price: float | None
    amount: float | None


class StoredDocument(TypedDict):
    id: int
    status: Literal["stored", "rejected"]
    document: dict[str, Any]
    """The document exactly as it was stored."""
    errors: list[ValidationError]
    line_items: list[StoredLineItem]
    idempotency_key: str | None
    created_at: str


def default_db_path() -> Path:
    """`$HIVEMESH_STORE_DB`, else `<state dir>/documents.db`."""
    env = os.environ.get(DB_ENV)
    return Path(env) if env else state_dir() / "documents.db"


def _bad(field: str, why: str, message: str | None = None) -> InvalidInputError:
    return InvalidInputError(message or f"{field}: {why}", field_violations={field: why})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _scalar(doc: dict[str, Any], name: str, kind: str, *, strict: bool, where: str) -> Any:
    """doc[name] if it has the column's type (or is absent/null); otherwise refuse (strict) or store NULL."""
    value = doc.get(name)
    ok = value is None or (_is_number(value) if kind == "number" else isinstance(value, str))
    if ok:
        return float(value) if kind == "number" and value is not None else value
    if strict:
        raise _bad(f"{where}.{name}", f"must be a {kind} or null")
    return None


def _rows(doc: dict[str, Any], *, strict: bool) -> tuple[list[Any], list[tuple[Any, ...]]]:
    """The documents-row values and the line_items rows for doc (strict: refuse mistyped values)."""
    values = [_scalar(doc, n, "string", strict=strict, where="input.document") for n in _TEXT_FIELDS]
    values += [_scalar(doc, n, "number", strict=strict, where="input.document") for n in _NUMBER_FIELDS]
    items = doc.get("line_items")
    rows: list[tuple[Any, ...]] = []
    if items is None:
        return values, rows
    if not isinstance(items, list):
        if strict:
            raise _bad("input.document.line_items", "must be a list of line items")
        return values, rows
    if len(items) > MAX_LINE_ITEMS:
        raise _bad("input.document.line_items", f"at most {MAX_LINE_ITEMS} line items")
    for i, item in enumerate(items):
        where = f"input.document.line_items[{i}]"
        if not isinstance(item, dict):
            if strict:
                raise _bad(where, "must be an object")
            continue
        desc = _scalar(item, "description", "string", strict=strict, where=where)
        nums = [_scalar(item, n, "number", strict=strict, where=where) for n in _ITEM_NUMBERS]
        rows.append((i, desc, *nums))
    return values, rows


def _check_store_input(result: Any) -> tuple[bool, dict[str, Any], list[dict[str, str]]]:
    if not isinstance(result, dict):
        raise _bad("input", "expected an object: the validation result {valid, document, errors}")
    extra = sorted(set(result) - {"valid", "document", "errors"})
    if extra:
        raise _bad(f"input.{extra[0]}", "unknown field")
    valid = result.get("valid")
    if not isinstance(valid, bool):
        raise _bad("input.valid", "required, must be true or false")
    document = result.get("document")
    if not isinstance(document, dict):
        raise _bad("input.document", "required, must be an object")
    errors = result.get("errors", [])
    if not isinstance(errors, list):
        raise _bad("input.errors", "must be a list of {field, message}")
    for i, err in enumerate(errors):
        if not (isinstance(err, dict) and isinstance(err.get("field"), str) and isinstance(err.get("message"), str)):
            raise _bad(f"input.errors[{i}]", "must be an object with string 'field' and 'message'")
    if valid and errors:
        raise _bad("input.errors", "a valid document carries no errors")
    if not valid and not errors:
        raise _bad("input.errors", "a rejected document must say why: give at least one error")
    return valid, document, errors


class StorageAgent(Agent):
    """Stores validated invoices and receipts in SQLite; rejected ones are kept, flagged, for review."""

    name = "storage"
    version = "1.0.0"
    owner = "documents"
    description = "Stores validated documents in SQLite (exactly once per idempotency key) and reads them back."

    def __init__(self, db_path: str | Path | None = None) -> None:
        super().__init__()
        self.db_path = Path(db_path) if db_path is not None else default_db_path()
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    async def on_start(self) -> None:
        await asyncio.to_thread(self._ensure_schema)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _ensure_schema(self) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            # Replicas sharing one file start together. Switching to WAL needs the file to itself and SQLite
            # answers "database is locked" at once (no busy wait) while another replica does the same, so
            # retry for a bounded time; a file already in WAL mode skips the switch.
            deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
            while True:
                try:
                    with closing(self._connect()) as conn:
                        if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                            conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
                        conn.executescript(_SCHEMA)
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.02)
            self._schema_ready = True

    def _store(
        self, valid: bool, document: dict[str, Any], errors: list[dict[str, str]], key: str | None
    ) -> StoreOutput:
        values, items = _rows(document, strict=valid)
        payload = json.dumps({"valid": valid, "document": document, "errors": errors}, sort_keys=True,
                             separators=(",", ":"))
        digest = hashlib.sha256(payload.encode()).hexdigest()
        self._ensure_schema()
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock now: the key check and insert are one step
            try:
                if key:
                    row = conn.execute(
                        "SELECT id, payload_sha256 FROM documents WHERE idempotency_key = ?", (key,)
                    ).fetchone()
                    if row is not None:
                        conn.execute("ROLLBACK")
                        if row[1] != digest:
                            raise _bad(
                                "context.idempotency_key",
                                "already used for a different document",
                                f"idempotency key {key[:64]!r} was already used to store a different document "
                                f"(id {row[0]}); use a new key for a new document",
                            )
                        return StoreOutput(id=int(row[0]), status="duplicate")
                status: Literal["stored", "rejected"] = "stored" if valid else "rejected"
                cur = conn.execute(
                    "INSERT INTO documents (status, idempotency_key, payload_sha256, document_type, invoice_number,"
                    " date, vendor, currency, subtotal, tax, total, errors, document, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        status, key or None, digest, *values,
                        json.dumps(errors, separators=(",", ":")),
                        json.dumps(document, separators=(",", ":")),
                        datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
                    ),
                )
                doc_id = cur.lastrowid
                assert doc_id is not None
                conn.executemany(
                    "INSERT INTO line_items (document_id, position, description, quantity, unit_price, amount)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [(doc_id, *item) for item in items],
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return StoreOutput(id=doc_id, status=status)

    def _get(self, doc_id: int) -> StoredDocument:
        self._ensure_schema()
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT id, status, document, errors, idempotency_key, created_at FROM documents WHERE id = ?",
                (doc_id,),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no stored document with id {doc_id}", metadata={"id": str(doc_id)})
            items = conn.execute(
                "SELECT description, quantity, unit_price, amount FROM line_items"
                " WHERE document_id = ? ORDER BY position",
                (doc_id,),
            ).fetchall()
        return StoredDocument(
            id=int(row[0]),
            status=row[1],
            document=json_depth.loads(row[2]),
            errors=json_depth.loads(row[3]),
            line_items=[
                StoredLineItem(description=d, quantity=q, unit_price=p, amount=a) for d, q, p, a in items
            ],
            idempotency_key=row[4],
            created_at=row[5],
        )

    @capability(
        description=(
            "Store a validation result {valid, document, errors}: valid → 'stored', invalid → kept as "
            "'rejected' for review; the same idempotency key stores once ('duplicate' with the same id)"
        ),
        tags=["documents", "storage"],
        dedupe=False,  # the key is stored with the document in one transaction; repeats answer 'duplicate'
    )
    async def store(self, result: StoreInput, ctx: Context) -> StoreOutput:
        valid, document, errors = _check_store_input(result)
        key = ctx.call.idempotency_key or None
        if key is not None and len(key) > 256:
            raise _bad("context.idempotency_key", "at most 256 characters")
        return await asyncio.to_thread(self._store, valid, document, errors, key)

    @capability(description="Read a stored document back by id", tags=["documents", "storage"], idempotent=True)
    async def get(self, ref: GetInput) -> StoredDocument:
        if not isinstance(ref, dict):
            raise _bad("input", "expected an object {id}")
        doc_id = ref.get("id")
        if not isinstance(doc_id, int) or isinstance(doc_id, bool) or doc_id < 1:
            raise _bad("input.id", "required, a positive integer")
        return await asyncio.to_thread(self._get, doc_id)
