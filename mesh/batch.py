"""Batch invoke: many calls in one request, each answered on its own (`Mesh.CallBatch`, `MeshClient.call_batch`).

One place decides the bounds and how an item's failure becomes its result, so the sidecar's `CallBatch` (what
an agent in any language uses) and the Python SDK's helper answer a batch the same way. Items run through the
ordinary outbound pipeline one call each (authz, grants, rate limits, budgets, retries and audit apply per
item), at most `concurrency` at a time; an item's error never fails the batch or its other items.

A `CallBatchResponse` is one gRPC message, so its answers together are bounded (`RESPONSE_LIMIT`): once the next
answer would pass it, that item and every item not yet started are answered PAYLOAD_TOO_LARGE and the rest are
never sent, while the answers already in are kept. Without this the batch ran every call (side effects included)
and then lost every answer to gRPC's bare "larger than max".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from google.protobuf.message import DecodeError

from hivemesh.mesh.errors import (
    AgentError,
    HivemeshError,
    InvalidInputError,
    InvalidOutputError,
    PayloadTooLargeError,
)
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES
from hivemesh.v1 import agent_pb2, mesh_pb2

MAX_ITEMS: Final = 1000
MAX_CONCURRENCY: Final = 64
DEFAULT_CONCURRENCY: Final = 8
RESPONSE_LIMIT: Final = MAX_MESSAGE_BYTES - 64 * 1024
"""The most a batch's results take together: the message limit, less room for the response's own envelope."""
_RESULT_OVERHEAD: Final = 16
"""A BatchItemResult's bytes around its outcome (its tag and length in the response, its index, the oneof's tag
and length), at most."""

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


def too_large(limit: int, *, ran: int | None = None) -> PayloadTooLargeError:
    """An item's refusal once the batch's answers are full: ran is the size of the answer it got (the call did run,
    so its effects happened), None when it was never started."""
    what = (f"this item ran, but its answer ({ran} bytes) was dropped" if ran is not None
            else "this item was not started")
    return PayloadTooLargeError(
        f"{what}: a batch's answers together take at most {limit} bytes (one gRPC message) and the answers already "
        "in filled it; split the batch into smaller ones (or call this item alone)",
        metadata={"max_batch_response_bytes": str(limit)})


def result_size(outcome: bytes | HivemeshError) -> int:
    """The most the outcome (a serialized InvokeResponse or an error) takes in a CallBatchResponse."""
    body = len(outcome) if isinstance(outcome, bytes) else item_error(outcome).ByteSize()
    return body + _RESULT_OVERHEAD


async def run_items(
    count: int,
    concurrency: int,
    one: Callable[[int], Awaitable[T]],
    *,
    size: Callable[[T | HivemeshError], int] | None = None,
    limit: int = RESPONSE_LIMIT,
) -> list[T | HivemeshError]:
    """one(i) for every item, at most concurrency at once; each slot holds the item's value or its error
    (an unexpected exception becomes an AgentError, so it is still the item's, not the batch's).

    With size (what one outcome takes in the answer), the outcomes kept take at most limit together: an outcome
    that would pass it becomes the item's PAYLOAD_TOO_LARGE refusal (`too_large`), and from then on items not yet
    started are refused without being started. Every item's place starts reserved for its refusal, so the
    refusals always fit as well."""
    gate = asyncio.Semaphore(concurrency)
    # A refusal's size, at most (one that ran names its answer's size, which is under ten times the message limit).
    reserve = 0 if size is None else max(size(too_large(limit)), size(too_large(limit, ran=MAX_MESSAGE_BYTES * 10)))
    used = count * reserve
    full = False

    async def attempt(i: int) -> T | HivemeshError:
        try:
            return await one(i)
        except HivemeshError as err:
            return err
        except (TypeError, ValueError) as exc:
            return InvalidInputError(str(exc))
        except Exception as exc:  # noqa: BLE001 - one item's surprise must not fail its neighbours
            return AgentError(f"{type(exc).__name__}: {exc}")

    async def guarded(i: int) -> T | HivemeshError:
        nonlocal used, full
        async with gate:
            if full:
                return too_large(limit)
            outcome = await attempt(i)
            if size is None:
                return outcome
            taken = size(outcome)
            if used - reserve + taken > limit:
                full = True  # answers still in flight are kept if they fit; nothing new starts
                return too_large(limit, ran=taken - _RESULT_OVERHEAD)
            used += taken - reserve
            return outcome

    return list(await asyncio.gather(*(guarded(i) for i in range(count))))


def item_error(err: HivemeshError) -> mesh_pb2.BatchItemError:
    return mesh_pb2.BatchItemError(code=err.code.name, reason=err.reason, message=err.message)


def response(outcomes: list[bytes | HivemeshError], *, limit: int = RESPONSE_LIMIT) -> mesh_pb2.CallBatchResponse:
    """The CallBatchResponse for per-item outcomes (serialized InvokeResponses or errors), in item order. Its
    encoded size is checked last: should it still pass limit (outcomes not bounded by `run_items`), the largest
    answers become their items' PAYLOAD_TOO_LARGE refusals until it fits, rather than gRPC failing it whole."""
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
    total = out.ByteSize()
    if total > limit:
        answered = sorted((r for r in out.results if r.HasField("response")), key=lambda r: -r.response.ByteSize())
        for result in answered:
            if total <= limit:
                break
            before = result.ByteSize()
            result.error.CopyFrom(item_error(too_large(limit, ran=result.response.ByteSize())))  # clears response
            out.failed += 1
            total += result.ByteSize() - before
    return out
