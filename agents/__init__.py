"""hivemesh.agents: reference agents for the document pipeline OCR → extraction → validation → storage.

    from hivemesh.agents import OcrAgent, ExtractorAgent, StorageAgent, process_document, list_samples

Names load lazily (PEP 562): importing this package loads nothing else, so the plain-gRPC validator
(`python -m hivemesh.agents.validate_plain`) runs without any hivemesh runtime module in the process.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hivemesh.agents.extract import ExtractorAgent, extract_fields
    from hivemesh.agents.ocr import OcrAgent
    from hivemesh.agents.pipeline import list_samples, process_document
    from hivemesh.agents.store import StorageAgent
    from hivemesh.agents.validate_plain import ValidatorServicer, validate_document

_LAZY = {
    "OcrAgent": "hivemesh.agents.ocr",
    "ExtractorAgent": "hivemesh.agents.extract",
    "extract_fields": "hivemesh.agents.extract",
    "StorageAgent": "hivemesh.agents.store",
    "ValidatorServicer": "hivemesh.agents.validate_plain",
    "validate_document": "hivemesh.agents.validate_plain",
    "process_document": "hivemesh.agents.pipeline",
    "list_samples": "hivemesh.agents.pipeline",
}

__all__ = [
    "ExtractorAgent",
    "OcrAgent",
    "StorageAgent",
    "ValidatorServicer",
    "extract_fields",
    "list_samples",
    "process_document",
    "validate_document",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
