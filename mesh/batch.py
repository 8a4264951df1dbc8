"""Batch invoke: many calls in one request, each answered on its own (`Mesh.CallBatch`, `MeshClient.call_batch`).

One place decides the bounds and how an item's failure becomes its result, so the sidecar's `CallBatch` (what
an agent in any language uses) and the Python SDK's helper answer a batch the same way. Items run through the
ordinary outbound pipeline one call each (authz, grants, rate limits, budgets, retries and audit apply per
item), at most `concurrency` at a time; an item's error never fails the batch or its other items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from google.protobuf.message import DecodeError

from hivemesh.mesh.errors import AgentError, HivemeshError, InvalidInputError, InvalidOutputError
from hivemesh.v1 import agent_pb2, mesh_pb2

MAX_ITEMS: Final = 1000
MAX_CONCURRENCY: Final = 64
DEFAULT_CONCURRENCY: Final = 8

T = TypeVar("T")


def check_bounds(items: int, concurrency: int) -> int:
    """The concurrency to use (0 picks the default); InvalidInputError naming the field when out of bounds."""
    if not 1 <= items <= MAX_ITEMS:
        msg = f"a batch has 1..{MAX_ITEMS} items, got {items}"
        raise InvalidInputError(msg, field_violations={"items": msg})
    concurrency = concurrency or DEFAULT_CONCURRENCY
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        msg = f"must be 1..{MAX_CONCURRENCY}"
        raise InvalidInputError(f"concurrency {msg}, got {concurrency}", field_violations={"concurrency": msg})
    return concurrency


async def run_items(count: int, concurrency: int, one: Callable[[int], Awaitable[T]]) -> list[T | HivemeshError]:
    """one(i) for every item, at most concurrency at once; each slot holds the item's value or its error
    (an unexpected exception becomes an AgentError, so it is still the item's, not the batch's)."""
    gate = asyncio.Semaphore(concurrency)

    async def guarded(i: int) -> T | HivemeshError:
        async with gate:
            try:
                return await one(i)
            except HivemeshError as err:
                return err
            except (TypeError, ValueError) as exc:
                return InvalidInputError(str(exc))
            except Exception as exc:  # noqa: BLE001 - one item's surprise must not fail its neighbours
                return AgentError(f"{type(exc).__name__}: {exc}")

    return list(await asyncio.gather(*(guarded(i) for i in range(count))))


def item_error(err: HivemeshError) -> mesh_pb2.BatchItemError:
    return mesh_pb2.BatchItemError(code=err.code.name, reason=err.reason, message=err.message)


def response(outcomes: list[bytes | HivemeshError]) -> mesh_pb2.CallBatchResponse:
    """The CallBatchResponse for per-item outcomes (serialized InvokeResponses or errors), in item order."""
    out = mesh_pb2.CallBatchResponse()
    for i, outcome in enumerate(outcomes):
        result = out.results.add(index=i)
        if isinstance(outcome, HivemeshError):
            result.error.CopyFrom(item_error(outcome))
            out.failed += 1
        else:
            try:
                result.response.CopyFrom(agent_pb2.InvokeResponse.FromString(outcome))
            except DecodeError:  # one peer's unreadable answer is that item's failure, not the whole batch's
                result.error.CopyFrom(item_error(InvalidOutputError("the answer is not an InvokeResponse message")))
                out.failed += 1
    return out
