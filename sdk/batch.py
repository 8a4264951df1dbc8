"""`MeshClient.call_batch`: one capability over a list of inputs, with a result or an error per item.

    results = await mesh.call_batch("extract", [{"text": t} for t in texts], concurrency=8, timeout=10)
    for item in results:
        print(item.index, item.output if item.ok else item.error)

The same bounds and per-item semantics as the sidecar's `Mesh.CallBatch` (`hivemesh.mesh.batch`), which is
what an agent in another language calls; a Python caller runs the items through its own proxyless pipeline, so
each item is an ordinary call (authz, grants, budgets, retries, audit) and one item's failure is only its own.

`MeshClient.call_batch_stream` is the same for inputs of any number, read lazily, with each outcome yielded as it
is ready (so memory is bounded by the concurrency, not by the input count):

    async with contextlib.aclosing(mesh.call_batch_stream("extract", documents(), concurrency=32)) as items:
        async for item in items:
            store(item.index, item.output if item.ok else item.error)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Unpack

from hivemesh.mesh import batch
from hivemesh.mesh.errors import CancelledError, FailedPreconditionError, HivemeshError, InvalidInputError
from hivemesh.mesh.outbound.pipeline import cancelled_by_caller
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
    return [_item(i, o) for i, o in enumerate(outcomes)]


def _item(index: int, outcome: Any) -> BatchItem:
    return BatchItem(index, error=outcome) if isinstance(outcome, HivemeshError) else BatchItem(index, output=outcome)


def call_batch_stream(
    mesh: MeshClient,
    capability: str,
    inputs: Iterable[Any] | AsyncIterable[Any],
    *,
    concurrency: int = batch.DEFAULT_CONCURRENCY,
    ordered: bool = False,
    idempotency_keys: Callable[[int, Any], str] | None = None,
    options: CallOptions | None = None,
    **overrides: Unpack[CallOptionArgs],
) -> AsyncGenerator[BatchItem, None]:
    """Call capability once per input, at most concurrency at a time, yielding each input's BatchItem (index: its
    position in inputs) as it finishes, or in input order with ordered=True. Items and options are call_batch's.

    Inputs (any iterable or async iterable) are read lazily: the next one is taken only when a slot is free, so
    at most concurrency inputs and outcomes are held, whatever their number; there is no `MAX_ITEMS` bound. With
    ordered=True the slots run from the oldest item not yet yielded: a slow item holds at most concurrency-1
    finished ones behind it, and no new call starts until it is done. A sync iterable is read on the event loop
    (use an async one for I/O). idempotency_keys(index, input) gives each item its own key.

    Ending the stream early (breaking out of the loop, `aclose()`) cancels the calls in flight and reads no more
    input; a generator input is closed, so its own cleanup runs. A plain break closes it when Python collects it
    (at once in CPython, in a task of its own): `contextlib.aclosing` closes it before the next line runs. An
    exception raised by the inputs themselves cancels what is in flight, then ends the stream with it.

    The client closed mid-stream: each call in flight ends as its item's CancelledError (it may have run: the
    consumer learns which), no more input is read, and the stream then ends with the closed client's
    FailedPreconditionError. Reading on would only turn every remaining input into that same error, without end for
    an endless input.

    Bad concurrency (InvalidInputError) or one key for every item (ValueError) is refused here, before any call.
    """
    concurrency = batch.check_bounds(1, concurrency)  # a stream has no item count: only its concurrency is checked
    base = CallOptions.of(options, overrides)
    if base.idempotency_key or (idempotency_keys is not None and not callable(idempotency_keys)):
        raise ValueError("a batch stream takes one idempotency key per input: "
                         "idempotency_keys=lambda index, input: ...")
    source: Iterator[Any] | AsyncIterator[Any] = aiter(inputs) if isinstance(inputs, AsyncIterable) else iter(inputs)
    return _stream(mesh, capability, source, concurrency, ordered, idempotency_keys, base)


async def _stream(
    mesh: MeshClient,
    capability: str,
    source: Iterator[Any] | AsyncIterator[Any],
    concurrency: int,
    ordered: bool,
    keys: Callable[[int, Any], str] | None,
    base: CallOptions,
) -> AsyncGenerator[BatchItem, None]:
    async def one(index: int, payload: Any) -> BatchItem:
        async def call(_: int) -> Any:  # the key is computed here, so a key function's error is the item's own
            key = keys(index, payload) if keys is not None else None
            return await mesh.call(capability, payload, options=base, idempotency_key=key)

        # A batch of one: its outcome is exactly what a call_batch item gets (an unexpected exception included).
        try:
            [outcome] = await batch.run_items(1, 1, call)
        except asyncio.CancelledError:
            if cancelled_by_caller():  # this stream cancelled it (ended early): nobody waits for the item
                raise
            # Not this task's cancellation: the item's error, never the consumer's (task.result() below).
            return BatchItem(index, error=CancelledError("the item's call was cancelled in flight, though its "
                                                         "stream was not: it may have run"))
        return _item(index, outcome)

    async def next_input(it: AsyncIterator[Any]) -> Any:
        return await anext(it)

    calls: set[asyncio.Task[BatchItem]] = set()
    ready: dict[int, BatchItem] = {}  # finished, not yet yielded; in the order they finished
    # An async source's next input, awaited alongside the calls: a slow source (or one fed by the consumer) never
    # holds back the items that finished meanwhile.
    fetch: asyncio.Task[Any] | None = None
    taken = yielded = 0
    exhausted = False
    closed: FailedPreconditionError | None = None  # the client was closed mid-stream: no more input is read

    def start(payload: Any) -> None:
        nonlocal taken
        calls.add(asyncio.create_task(one(taken, payload)))
        taken += 1

    def refused() -> bool:
        """The client was closed (or its shared node stopped): what is in flight ends, nothing more is read."""
        nonlocal closed, exhausted
        try:
            mesh._outbound()
        except FailedPreconditionError as err:
            closed, exhausted = err, True
            return True
        return False

    try:
        while True:
            item = ready.pop(yielded if ordered else next(iter(ready), -1), None)
            if item is not None:
                yielded += 1
            # Slots count from the oldest item not yet yielded (with ordered=True, that is the reorder window): the
            # one about to be yielded frees its slot, so the calls go on while the consumer handles it.
            while not exhausted and fetch is None and taken - yielded < concurrency and not refused():
                if isinstance(source, AsyncIterator):
                    fetch = asyncio.create_task(next_input(source))
                elif (payload := next(source, _END)) is _END:
                    exhausted = True
                else:
                    start(payload)
            if item is not None:
                yield item
                continue
            if not calls and (fetch is None or refused()):  # closed: an input still awaited is not waited for
                if closed is not None:
                    raise closed
                return
            waiting: set[asyncio.Task[Any]] = {*calls, fetch} if fetch is not None else {*calls}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if fetch is not None and fetch in done:
                try:
                    payload = fetch.result()  # the source's own exception ends the stream here (finally cancels)
                    if not refused():  # taken as the client closed: it was never called, it has no index
                        start(payload)
                except StopAsyncIteration:
                    exhausted = True
                fetch = None
            for task in done & calls:
                calls.discard(task)
                finished = task.result()
                ready[finished.index] = finished
    finally:
        pending = [*calls, *([fetch] if fetch is not None else [])]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if isinstance(source, AsyncIterator):
            if (aclose := getattr(source, "aclose", None)) is not None:
                await aclose()
        elif (close := getattr(source, "close", None)) is not None:
            close()


_END = object()
