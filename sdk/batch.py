"""`MeshClient.call_batch`: one capability over a list of inputs, with a result or an error per item.

    results = await mesh.call_batch("extract", [{"text": t} for t in texts], concurrency=8, timeout=10)
    for item in results:
        print(item.index, item.output if item.ok else item.error)

The same bounds and per-item semantics as the sidecar's `Mesh.CallBatch` (`hivemesh.mesh.batch`), which is
what an agent in another language calls; a Python caller runs the items through its own proxyless pipeline, so
each item is an ordinary call (authz, grants, budgets, retries, audit) and one item's failure is only its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Unpack

from hivemesh.mesh import batch
from hivemesh.mesh.errors import HivemeshError, InvalidInputError
from hivemesh.sdk.call_options import CallOptionArgs, CallOptions

if TYPE_CHECKING:
    from hivemesh.sdk.client import MeshClient


@dataclass(frozen=True)
class BatchItem:
    """One item's outcome: its decoded output, or the typed error its own call raised."""

    index: int
    output: Any = None
    error: HivemeshError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def call_batch(
    mesh: MeshClient,
    capability: str,
    inputs: Sequence[Any],
    *,
    concurrency: int = batch.DEFAULT_CONCURRENCY,
    idempotency_keys: Sequence[str] | None = None,
    options: CallOptions | None = None,
    **overrides: Unpack[CallOptionArgs],
) -> list[BatchItem]:
    """Call capability once per input, at most concurrency at a time; one BatchItem per input, in order. The
    call options (`timeout=`, `context=`, or `options=`) apply to every item.
    Raises InvalidInputError only for the batch itself (no items, too many, bad concurrency, key count)."""
    concurrency = batch.check_bounds(len(inputs), concurrency)
    if idempotency_keys is not None and len(idempotency_keys) != len(inputs):
        msg = "one idempotency key per input"
        raise InvalidInputError(msg, field_violations={"idempotency_keys": msg})
    base = CallOptions.of(options, overrides)
    if base.idempotency_key:  # one key for every item would apply only the first item's effect
        raise ValueError("a batch takes one idempotency key per input: idempotency_keys=[...]")

    async def one(i: int) -> Any:
        key = idempotency_keys[i] if idempotency_keys is not None else None
        return await mesh.call(capability, inputs[i], options=base, idempotency_key=key)

    outcomes = await batch.run_items(len(inputs), concurrency, one)
    return [BatchItem(i, error=o) if isinstance(o, HivemeshError) else BatchItem(i, output=o)
            for i, o in enumerate(outcomes)]
