"""The extraction agent: OCR text in, invoice/receipt fields out, by rules and regular expressions.

Deliberately rule-based: the same text always gives the same fields, and every rule is readable here.
It reports what the text says and normalizes formats (dates to ISO, amounts to numbers); judging whether
the document is consistent is the validation agent's job, so an impossible date such as 02/30/2024 comes
out as "2024-02-30" for the validator to flag rather than silently disappearing.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypedDict

from hivemesh.sdk import Agent, InvalidInputError, capability

MAX_TEXT_CHARS = 200_000


class ExtractInput(TypedDict):
    text: str


class LineItem(TypedDict):
    description: str
    quantity: float | None
    unit_price: float | None
    amount: float | None


class Fields(TypedDict):
    document_type: Literal["invoice", "receipt", "unknown"]
    invoice_number: str | None
    """The document's own number: invoice number, or receipt number for receipts."""
    date: str | None
    """ISO 8601 (YYYY-MM-DD) as written on the document, not checked against the calendar."""
    vendor: str | None
    line_items: list[LineItem]
    subtotal: float | None
    tax: float | None
    total: float | None
    currency: str | None
    """ISO 4217 code: written on the document, or USD for a '$' sign."""


_MONEY = r"\$?\d{1,3}(?:,\d{3})+\.\d{2}|\$?\d+\.\d{2}"
_MONEY_RE = re.compile(rf"(?<![\d.])(?:{_MONEY})(?![\d%])")
_QTY = r"\d+(?:\.\d+)?"
# "Hex bolts M8     100   0.25   25.00": description, quantity, unit price, amount.
_ITEM_COLUMNS = re.compile(
    rf"^(?P<desc>.*?[A-Za-z].*?)\s+(?P<qty>{_QTY})\s+(?P<price>{_MONEY})\s+(?P<amount>{_MONEY})$"
)
# "2 x Latte @ $4.50   $9.00": quantity, description, unit price, amount.
_ITEM_TIMES = re.compile(
    rf"^(?P<qty>{_QTY})\s*[xX*]\s+(?P<desc>.+?)\s+@\s*(?P<price>{_MONEY})\s+(?P<amount>{_MONEY})$"
)
# "Milk 1L             2.49": description and amount in columns (quantity 1).
_ITEM_SINGLE = re.compile(rf"^(?P<desc>.*?[A-Za-z].*?)\s{{2,}}(?P<amount>{_MONEY})$")
_LABELLED_AMOUNT = re.compile(rf"^(?P<label>.*?[A-Za-z].*?)\s+(?P<amount>{_MONEY})$")

_SUBTOTAL = re.compile(r"\bsub\s*-?\s*total\b", re.IGNORECASE)
_TAX = re.compile(r"\b(?:tax|vat|gst|hst)\b", re.IGNORECASE)
_TOTAL = re.compile(r"\b(?:total|amount\s+due|balance\s+due)\b", re.IGNORECASE)
_PAYMENT = re.compile(
    r"\b(?:cash|change|card|paid|payment|tendered|visa|mastercard|amex|debit|credit|tip)\b", re.IGNORECASE
)

_DOC_TYPE = re.compile(r"\b(invoice|receipt)\b", re.IGNORECASE)
_NUMBER = re.compile(
    r"\b(?:invoice|inv|receipt|bill)\s*(?:no\.?|number|num\.?|#)\s*:?\s*#?\s*(?P<id>[A-Za-z0-9][A-Za-z0-9/-]*)",
    re.IGNORECASE,
)
_CURRENCY_CODE = re.compile(r"\b(USD|EUR|GBP|CHF|JPY|CAD|AUD|SEK|NOK|DKK|PLN|CZK|INR|CNY)\b")
_VENDOR_LABEL = re.compile(r"^\s*(?:vendor|from|seller|merchant|supplier)\s*:\s*(?P<name>.+?)\s*$", re.IGNORECASE)

_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}
_DATE_ISO = re.compile(r"\b(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})\b")
_DATE_US = re.compile(r"\b(?P<m>\d{1,2})/(?P<d>\d{1,2})/(?P<y>\d{4})\b")  # slashes: month first (US)
_DATE_EU = re.compile(r"\b(?P<d>\d{1,2})\.(?P<m>\d{1,2})\.(?P<y>\d{4})\b")  # dots: day first
_DATE_TEXT_MDY = re.compile(r"\b(?P<mon>[A-Za-z]{3})[a-z]*\.?\s+(?P<d>\d{1,2}),?\s+(?P<y>\d{4})\b")
_DATE_TEXT_DMY = re.compile(r"\b(?P<d>\d{1,2})\s+(?P<mon>[A-Za-z]{3})[a-z]*\.?,?\s+(?P<y>\d{4})\b")


def parse_amount(text: str) -> float:
    """'$1,250.00' → 1250.0."""
    return float(text.replace("$", "").replace(",", ""))


def _date_in(line: str) -> str | None:
    for pattern in (_DATE_ISO, _DATE_US, _DATE_EU, _DATE_TEXT_MDY, _DATE_TEXT_DMY):
        for m in pattern.finditer(line):
            groups = m.groupdict()
            if "mon" in groups:
                month = _MONTHS.get(groups["mon"].lower())
                if month is None:
                    continue
            else:
                month = int(groups["m"])
            return f"{int(groups['y']):04d}-{month:02d}-{int(groups['d']):02d}"
    return None


def _find_date(lines: list[str]) -> str | None:
    """The date on a line that says 'date', else the first date anywhere."""
    labelled = [ln for ln in lines if re.search(r"\bdate\b", ln, re.IGNORECASE)]
    for line in [*labelled, *lines]:
        found = _date_in(line)
        if found:
            return found
    return None


def _find_vendor(lines: list[str]) -> str | None:
    for line in lines:
        m = _VENDOR_LABEL.match(line)
        if m:
            return m.group("name")
    for line in lines:
        stripped = line.strip()
        if not re.search(r"[A-Za-z]", stripped) or ":" in stripped:
            continue
        if _DOC_TYPE.fullmatch(stripped) or _NUMBER.search(stripped) or _MONEY_RE.search(stripped):
            continue
        return stripped
    return None


def _item(desc: str, qty: str | None, price: str | None, amount: str) -> LineItem:
    amt = parse_amount(amount)
    return LineItem(
        description=desc.strip(),
        quantity=float(qty) if qty is not None else 1.0,
        unit_price=parse_amount(price) if price is not None else amt,
        amount=amt,
    )


def extract_fields(text: str) -> Fields:
    """Apply the rules to OCR text (pure function; the capability wraps it)."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    content = [ln for ln in lines if ln.strip()]
    doc_type_match = _DOC_TYPE.search(text)
    doc_type: Literal["invoice", "receipt", "unknown"] = "unknown"
    if doc_type_match:
        doc_type = "invoice" if doc_type_match.group(1).lower() == "invoice" else "receipt"
    number_match = next((m for m in map(_NUMBER.search, content) if m and re.search(r"\d", m.group("id"))), None)
    codes = _CURRENCY_CODE.findall(text)
    currency = codes[0] if codes else ("USD" if "$" in text else None)

    items: list[LineItem] = []
    subtotal = tax = total = None
    for raw in content:
        line = raw.strip()
        m = _ITEM_TIMES.match(line)
        if m:
            items.append(_item(m.group("desc"), m.group("qty"), m.group("price"), m.group("amount")))
            continue
        labelled = _LABELLED_AMOUNT.match(line)
        if labelled:
            label, amount = labelled.group("label"), parse_amount(labelled.group("amount"))
            if _SUBTOTAL.search(label):
                subtotal = amount if subtotal is None else subtotal
                continue
            if _TAX.search(label):
                tax = amount if tax is None else tax
                continue
            if _TOTAL.search(label):
                total = amount if total is None else total
                continue
            if _PAYMENT.search(label):
                continue
        m = _ITEM_COLUMNS.match(line)
        if m:
            items.append(_item(m.group("desc"), m.group("qty"), m.group("price"), m.group("amount")))
            continue
        m = _ITEM_SINGLE.match(line)
        if m:
            items.append(_item(m.group("desc"), None, None, m.group("amount")))
    return Fields(
        document_type=doc_type,
        invoice_number=number_match.group("id") if number_match else None,
        date=_find_date(content),
        vendor=_find_vendor(content),
        line_items=items,
        subtotal=subtotal,
        tax=tax,
        total=total,
        currency=currency,
    )


def _check_input(doc: Any) -> str:
    if not isinstance(doc, dict):
        raise InvalidInputError("input must be an object", field_violations={"input": "expected an object"})
    text = doc.get("text")
    if not isinstance(text, str):
        raise InvalidInputError(
            "input.text is required and must be a string", field_violations={"input.text": "expected a string"}
        )
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidInputError(
            f"text is {len(text)} characters, over the {MAX_TEXT_CHARS} limit",
            field_violations={"input.text": "too long"},
        )
    extra = sorted(set(doc) - {"text"})
    if extra:
        raise InvalidInputError(
            f"unknown input fields {extra}", field_violations={f"input.{extra[0]}": "unknown field"}
        )
    return text


class ExtractorAgent(Agent):
    """Pulls invoice and receipt fields out of OCR text with readable rules."""

    name = "extractor"
    version = "1.0.0"
    owner = "documents"
    description = "Extracts invoice/receipt fields (number, date, vendor, line items, totals) from OCR text."

    @capability(
        description="OCR text → invoice/receipt fields: type, number, ISO date, vendor, line items, totals, currency",
        tags=["documents", "extraction"],
        idempotent=True,
        max_input_bytes=MAX_TEXT_CHARS * 4 + 1024,
    )
    async def extract(self, doc: ExtractInput) -> Fields:
        return extract_fields(_check_input(doc))
