"""hivemesh.agents: reference agents for the document pipeline OCR → extraction → validation → storage, and for
the five orchestration pattern examples (research, helpdesk, customer service, content, contract review).

    from hivemesh.agents import OcrAgent, ExtractorAgent, StorageAgent, process_document, list_samples

Names load lazily (PEP 562): importing this package loads nothing else, so the plain-gRPC validator
(`python -m hivemesh.agents.validate_plain`) runs without any hivemesh runtime module in the process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hivemesh.mesh.lazy import lazy_exports

if TYPE_CHECKING:
    from hivemesh.agents.content import CONTENT_LOOP
    from hivemesh.agents.contract import CONTRACT_REVIEW
    from hivemesh.agents.customer_service import CUSTOMER_SERVICE
    from hivemesh.agents.extract import ExtractorAgent, extract_fields
    from hivemesh.agents.helpdesk import HELPDESK, HELPDESK_CHAT
    from hivemesh.agents.ocr import OcrAgent
    from hivemesh.agents.pipeline import list_samples, process_document
    from hivemesh.agents.research import RESEARCH
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
    # the five orchestration pattern examples (see README.md)
    "RESEARCH": "hivemesh.agents.research",
    "HELPDESK": "hivemesh.agents.helpdesk",
    "HELPDESK_CHAT": "hivemesh.agents.helpdesk",
    "CUSTOMER_SERVICE": "hivemesh.agents.customer_service",
    "CONTENT_LOOP": "hivemesh.agents.content",
    "CONTRACT_REVIEW": "hivemesh.agents.contract",
}

__all__ = [
    "CONTENT_LOOP",
    "CONTRACT_REVIEW",
    "CUSTOMER_SERVICE",
    "HELPDESK",
    "HELPDESK_CHAT",
    "RESEARCH",
    "ExtractorAgent",
    "OcrAgent",
    "StorageAgent",
    "ValidatorServicer",
    "extract_fields",
    "list_samples",
    "process_document",
    "validate_document",
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
