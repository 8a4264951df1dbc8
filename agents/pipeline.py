"""The document pipeline the demo runs: OCR → extraction → validation → storage, each step on the mesh.

    async with MeshClient.connect(name="demo") as mesh:
        run = await process_document(mesh, "invoice-001")
        for step in run["steps"]:
            print(step["step"], step["agent"], step["packaging"], [h["kind"] for h in step["hops"]])

Each step is called by capability name; the mesh picks the instance. The steps record which agent and
packaging served them and the hops the call took, so the demo can show that `validate` went through a
sidecar to a plain gRPC server while the others were served in-process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any, Protocol, TypedDict

from hivemesh.agents._samples import list_samples as _list_samples
from hivemesh.sdk.client import CallResult

STEPS = (("ocr", "ocr"), ("extract", "extract"), ("validate", "validate"), ("store", "store"))
"""(step name, capability) in pipeline order."""


class CapabilityCaller(Protocol):
    """What the pipeline needs from a mesh client (`hivemesh.sdk.MeshClient` is one)."""

    async def call_detailed(
        self,
        capability: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> CallResult: ...


class HopInfo(TypedDict):
    kind: str
    identity: str
    instance: str
    endpoint: str


class StepRecord(TypedDict):
    step: str
    capability: str
    agent: str
    instance: str
    packaging: str
    endpoint: str
    hops: list[HopInfo]
    elapsed_ms: float


class PipelineRun(TypedDict):
    source: str
    """The sample name, or 'image:<sha256 prefix>' for an image passed in."""
    text: str
    document: dict[str, Any]
    valid: bool
    errors: list[dict[str, str]]
    id: int
    status: str
    """'stored', 'rejected' (kept for review) or 'duplicate' (this document was stored before)."""
    steps: list[StepRecord]


def list_samples() -> list[str]:
    """Names of the sample documents shipped with the agents (accepted by `process_document`)."""
    return _list_samples()


def _record(step: str, capability: str, result: CallResult, started: float) -> StepRecord:
    inst = result.instance
    return StepRecord(
        step=step,
        capability=capability,
        agent=inst.card.name,
        instance=inst.instance_id,
        packaging=inst.packaging,
        endpoint=inst.endpoint,
        hops=[HopInfo(kind=h.kind, identity=h.identity, instance=h.instance, endpoint=h.endpoint) for h in result.hops],
        elapsed_ms=round((time.perf_counter() - started) * 1000, 2),
    )


def _ocr_input(sample_or_image: str | bytes) -> tuple[dict[str, str], str]:
    if isinstance(sample_or_image, bytes | bytearray):
        data = bytes(sample_or_image)
        return {"image_b64": base64.b64encode(data).decode("ascii"), "format": "pgm"}, (
            "image:" + hashlib.sha256(data).hexdigest()[:16]
        )
    if isinstance(sample_or_image, str):
        if sample_or_image not in _list_samples():
            raise ValueError(f"unknown sample {sample_or_image!r}; samples: {', '.join(_list_samples())}")
        return {"sample": sample_or_image}, sample_or_image
    raise TypeError("process_document takes a sample name (str) or PGM image bytes")


def idempotency_key_for(validation: dict[str, Any]) -> str:
    """A key derived from the validated content: processing the same document twice stores it once."""
    canonical = json.dumps(validation, sort_keys=True, separators=(",", ":")).encode()
    return "doc-" + hashlib.sha256(canonical).hexdigest()


async def process_document(
    mesh: CapabilityCaller,
    sample_or_image: str | bytes,
    *,
    timeout: float = 10.0,
    idempotency_key: str | None = None,
) -> PipelineRun:
    """Run one document through ocr → extract → validate → store on the mesh.

    Args:
        mesh: a started `MeshClient` (anything with its `call_detailed`).
        sample_or_image: a shipped sample's name (see `list_samples()`), or the bytes of a PGM scan.
        timeout: deadline of each step, in seconds.
        idempotency_key: the storage key; default derived from the validated content, so re-running the
            same document answers 'duplicate' with the first run's id instead of storing it again.
    Returns:
        The stored id and status, the extracted document, its validation verdict, and per step the agent,
        instance, packaging and hops that served it.
    Raises:
        ValueError / TypeError: for an unknown sample name or an argument of the wrong type.
        hivemesh.sdk errors (InvalidInputError, NoLiveInstanceError, ...) from the step that failed.
    """
    ocr_input, source = _ocr_input(sample_or_image)
    steps: list[StepRecord] = []

    async def step(name: str, capability: str, payload: Any, key: str | None = None) -> Any:
        started = time.perf_counter()
        result = await mesh.call_detailed(capability, payload, timeout=timeout, idempotency_key=key)
        steps.append(_record(name, capability, result, started))
        return result.output

    ocr = await step("ocr", "ocr", ocr_input)
    fields = await step("extract", "extract", {"text": ocr["text"]})
    verdict = await step("validate", "validate", fields)
    stored = await step("store", "store", verdict, idempotency_key or idempotency_key_for(verdict))
    return PipelineRun(
        source=source,
        text=ocr["text"],
        document=fields,
        valid=bool(verdict["valid"]),
        errors=list(verdict["errors"]),
        id=int(stored["id"]),
        status=str(stored["status"]),
        steps=steps,
    )
