"""The OCR agent: a scanned page (PGM) in, its text out. First step of the document pipeline."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any, Literal, TypedDict

from hivemesh.agents._ocr_engine import MAX_PIXELS, MAX_SIDE, PgmError, decode_pgm, recognize
from hivemesh.agents._samples import list_samples, sample_image
from hivemesh.sdk import Agent, InvalidInputError, capability

MAX_IMAGE_B64_CHARS = 4 * 1024 * 1024
"""Longest accepted base64 text (about 3 MB of image)."""


class OcrInput(TypedDict, total=False):
    """Exactly one of `image_b64` (with optional `format`) or `sample`."""

    image_b64: str
    format: Literal["pgm"]
    sample: str


class OcrLine(TypedDict):
    text: str
    confidence: float
    box: list[int]
    """x, y, width, height in pixels."""


class OcrOutput(TypedDict):
    text: str
    lines: list[OcrLine]
    confidence: float
    """Mean per-character confidence, 0..1 (1 = every glyph matched its template exactly)."""
    scale: int
    """Detected pixels per font pixel."""


_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "image_b64": {"type": "string", "maxLength": MAX_IMAGE_B64_CHARS},
        "format": {"enum": ["pgm"]},
        "sample": {"enum": list_samples()},
    },
    "additionalProperties": False,
    "oneOf": [{"required": ["image_b64"]}, {"required": ["sample"]}],
}


def _image_bytes(doc: Any) -> bytes:
    """The PGM bytes the input names, or InvalidInputError naming the offending field."""
    if not isinstance(doc, dict):
        raise InvalidInputError("input must be an object", field_violations={"input": "expected an object"})
    unknown = sorted(set(doc) - {"image_b64", "format", "sample"})
    if unknown:
        raise InvalidInputError(
            f"unknown input fields {unknown}", field_violations={f"input.{unknown[0]}": "unknown field"}
        )
    has_image, has_sample = "image_b64" in doc, "sample" in doc
    if has_image == has_sample:
        raise InvalidInputError(
            "give exactly one of 'image_b64' or 'sample'",
            field_violations={"input": "exactly one of image_b64 or sample is required"},
        )
    if has_sample:
        name = doc["sample"]
        if not isinstance(name, str) or name not in list_samples():
            raise InvalidInputError(
                f"unknown sample {str(name)[:64]!r}; shipped samples: {', '.join(list_samples())}",
                field_violations={"input.sample": "not a shipped sample"},
            )
        return sample_image(name)
    fmt = doc.get("format", "pgm")
    if fmt != "pgm":
        raise InvalidInputError(
            f"unsupported image format {str(fmt)[:32]!r}; only 'pgm' (binary P5) is read",
            field_violations={"input.format": "must be 'pgm'"},
        )
    text = doc["image_b64"]
    if not isinstance(text, str):
        raise InvalidInputError("image_b64 must be a string", field_violations={"input.image_b64": "expected a string"})
    if len(text) > MAX_IMAGE_B64_CHARS:
        raise InvalidInputError(
            f"image_b64 is {len(text)} characters, over the {MAX_IMAGE_B64_CHARS} limit",
            field_violations={"input.image_b64": "too large"},
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(
            f"image_b64 is not valid base64: {exc}", field_violations={"input.image_b64": "invalid base64"}
        ) from None


def _read(data: bytes) -> OcrOutput:
    try:
        image = decode_pgm(data)
    except PgmError as exc:
        raise InvalidInputError(
            f"image is not a readable PGM: {exc}", field_violations={"input.image_b64": str(exc)}
        ) from None
    result = recognize(image)
    return OcrOutput(
        text=result.text,
        lines=[OcrLine(text=ln.text, confidence=ln.confidence, box=list(ln.box)) for ln in result.lines],
        confidence=result.confidence,
        scale=result.scale,
    )


class OcrAgent(Agent):
    """Reads the text of scanned documents (binary PGM, fixed-pitch bitmap font), deterministically."""

    name = "ocr"
    version = "1.0.0"
    owner = "documents"
    description = "Reads the text of a scanned document image (PGM) by template matching; no ML, no network."

    @capability(
        description=(
            "Recognize the text of a scanned page: {image_b64, format: 'pgm'} or {sample: <shipped sample>} "
            f"→ {{text, lines, confidence}}. Images up to {MAX_SIDE}x{MAX_SIDE} and {MAX_PIXELS} pixels."
        ),
        tags=["documents", "ocr"],
        idempotent=True,
        input_schema=_INPUT_SCHEMA,
    )
    async def ocr(self, doc: OcrInput) -> OcrOutput:
        data = _image_bytes(doc)
        # Recognition is CPU work (~10 ms a page): keep it off the event loop so the server stays responsive.
        return await asyncio.to_thread(_read, data)
