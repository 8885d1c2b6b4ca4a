"""Dynamic batching: merge concurrent requests along the batch dimension, split the answers back.

A batch leaves when it holds ``max_batch_size`` rows or when its oldest request
has waited ``max_wait``; while every upstream slot is busy it keeps filling (up
to the maximum), so batches grow with load instead of queueing. Requests batch
only with requests of the same signature (model, input names, datatypes and
shapes after the batch dimension, requested outputs, parameters). Each request
carries its own future and deadline: a caller that gave up (timeout, gone) or
whose deadline has passed is skipped when its batch is launched, never sent
upstream. An error reaches every caller of its batch, except one that may be a
single member's fault (a client error from the upstream): then the batch is
bisected until the culprit is alone with its error and the others are answered.

Admission is decided before a request is even read (:meth:`DynamicBatcher.admit`):
a place is refused when ``max_queue`` requests wait, or when the expected wait
(the batches ahead at the recent service time) exceeds ``max_queue_wait_s``.

The batcher knows no transport (as MLServer's adaptive batcher and Ray Serve's
``@serve.batch`` do not): it raises its own :class:`BatchError` subclasses, and
the sidecar chooses the HTTP status of each.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from leanserve_serving.tensors import InferRequest, Tensor

#: Runs one merged request upstream; returns the merged outputs.
RunBatch = Callable[[str, InferRequest], Awaitable[list[Tensor]]]


class BatchError(Exception):
    """A request the batcher could not answer; the message is the reason a client reads."""


class QueueFullError(BatchError):
    """``max_queue`` requests already wait for a batch: the caller should retry shortly."""

    def __init__(self, max_queue: int) -> None:
        super().__init__(f"queue full ({max_queue} requests waiting); retry shortly")
        self.max_queue = max_queue


class WaitTooLongError(BatchError):
    """The expected wait for an answer exceeds what the caller may wait: the caller should retry shortly."""

    def __init__(self, expected_s: float, max_wait_s: float) -> None:
        super().__init__(f"queue too slow (expected wait {expected_s:.3g} s, over {max_wait_s:g} s); retry shortly")
        self.expected_s = expected_s
        self.max_wait_s = max_wait_s


class AnswerTimeoutError(BatchError):
    """No answer within the caller's timeout; if its request was still queued, its batch skips it."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"no answer from the model within {timeout_s:g} s")
        self.timeout_s = timeout_s


class UpstreamShapeError(BatchError):
    """The upstream answered a merged request with an output not batched along its rows: it cannot be split."""

    def __init__(self, output: str, shape: tuple[int, ...], rows: int) -> None:
        super().__init__(f"upstream output '{output}' has shape {list(shape)}, not batched along {rows} rows")
        self.output = output
        self.shape = shape
        self.rows = rows


def signature(model: str, request: InferRequest) -> tuple[Any, ...] | None:
    """What a request may batch with, or None when it cannot batch (a scalar input)."""
    if any(len(t.shape) == 0 for t in request.inputs):
        return None
    inputs = tuple(sorted((t.name, t.datatype, t.shape[1:]) for t in request.inputs))
    outputs = tuple(request.outputs) if request.outputs is not None else None
    params = orjson.dumps(request.parameters, option=orjson.OPT_SORT_KEYS) if request.parameters else b""
    return (model, inputs, outputs, params)


def rows(request: InferRequest) -> int:
    return request.inputs[0].shape[0] if request.inputs[0].shape else 1


def merge(requests: list[InferRequest]) -> InferRequest:
    """One request whose inputs are the given requests' inputs concatenated along dimension 0."""
    first = requests[0]
    if len(requests) == 1:
        return first
    merged = []
    for tensor in first.inputs:
        parts = [next(t for t in r.inputs if t.name == tensor.name).data for r in requests]
        data = np.concatenate(parts, axis=0)
        merged.append(Tensor(tensor.name, tensor.datatype, tuple(data.shape), data))
    return InferRequest(inputs=merged, parameters=first.parameters, outputs=first.outputs)


def split(outputs: list[Tensor], sizes: list[int]) -> list[list[Tensor]]:
    """Cut merged outputs back into per-request outputs by row counts (:class:`UpstreamShapeError` when an
    output is not batched along the merged rows)."""
    total = sum(sizes)
    for out in outputs:
        if not out.shape or out.shape[0] != total:
            raise UpstreamShapeError(out.name, out.shape, total)
    result: list[list[Tensor]] = []
    start = 0
    for size in sizes:
        part = []
        for out in outputs:
            data = out.data[start : start + size]
            part.append(Tensor(out.name, out.datatype, tuple(data.shape), data))
        result.append(part)
        start += size
    return result


def expected_wait_s(waiting: int, in_flight: int, max_batch_size: int, concurrency: int, service_s: float) -> float:
    """Seconds until a request joining ``waiting`` others is answered: the batches in flight, those queued
    ahead and its own, ``concurrency`` at a time, each taking ``service_s`` (an estimate, not a promise)."""
    batches = in_flight + math.ceil((waiting + 1) / max(1, max_batch_size))
    return math.ceil(batches / max(1, concurrency)) * service_s


def never(_: Exception) -> bool:
    return False


@dataclass
class Place:
    """A place in the queue, taken before a request is read (a full queue refuses it before paying for its
    decoding), given back when the request joins the queue or leaves without joining it (cache hit, error)."""

    give_back: Callable[[], None] | None

    def release(self) -> None:
        if self.give_back is not None:
            self.give_back()
            self.give_back = None


@dataclass
class _Pending:
    request: InferRequest
    future: asyncio.Future[list[Tensor]]
    rows: int
    timeout_s: float
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        return self.enqueued + self.timeout_s


@dataclass
class _Group:
    items: list[_Pending] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass
class BatchStats:
    """Hooks the sidecar's metrics hang on."""

    on_batch: Callable[[str, int], None] = lambda model, size: None
    on_queue_depth: Callable[[str, int], None] = lambda model, depth: None


class DynamicBatcher:
    """Batches requests per signature and runs them through ``run_batch`` with bounded concurrency.

    ``isolate`` says whether a failed batch's error may be one member's fault (the sidecar: a client error
    from the upstream); such a batch is bisected rather than failed whole.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        concurrency: int,
        stats: BatchStats | None = None,
        isolate: Callable[[Exception], bool] = never,
        max_queue_wait_s: float = math.inf,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait_s = max(0.0, max_wait_s)
        self.max_queue = max_queue
        self.max_queue_wait_s = max_queue_wait_s
        self.concurrency = max(1, concurrency)
        self.slots = asyncio.Semaphore(self.concurrency)
        self.stats = stats or BatchStats()
        self.isolate = isolate
        self.groups: dict[tuple[Any, ...], _Group] = {}
        self.queued = 0
        self.reserved = 0
        """Places taken by requests being read, decoded and checked: they count against ``max_queue``."""
        self.service_s = 0.0
        """Recent seconds per upstream call (moving average of the successful ones); 0 until the first."""
        self._running: dict[object, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def service_estimate(self) -> float:
        """Seconds one batch takes upstream: the recent average, or longer while a call in flight has already
        taken longer (a frozen model server shows here before any call ends)."""
        oldest = min(self._running.values(), default=None)
        running = time.monotonic() - oldest if oldest is not None else 0.0
        return max(self.service_s, running)

    def admit(self) -> Place:
        """A place in the queue, or :class:`QueueFullError` / :class:`WaitTooLongError` at once.

        Cheap on purpose (two counters and a product): the sidecar asks before reading a request, so a
        refusal costs nothing of the saturated loop.
        """
        waiting = self.queued + self.reserved
        if waiting >= self.max_queue:
            raise QueueFullError(self.max_queue)
        wait = expected_wait_s(
            waiting, len(self._running), self.max_batch_size, self.concurrency, self.service_estimate()
        )
        if wait > self.max_queue_wait_s:
            raise WaitTooLongError(wait, self.max_queue_wait_s)
        self.reserved += 1
        return Place(self._give_back)

    def _give_back(self) -> None:
        self.reserved -= 1

    async def submit(
        self, model: str, request: InferRequest, timeout_s: float, place: Place | None = None
    ) -> list[Tensor]:
        """Queue a request (in ``place`` when :meth:`admit` gave it one) and wait for its share of a batch.

        Raises :class:`QueueFullError` or :class:`WaitTooLongError` without a place when :meth:`admit` would,
        :class:`AnswerTimeoutError` after ``timeout_s``, and whatever ``run_batch`` (or :func:`split`) raised
        for its batch.
        """
        (place or self.admit()).release()  # the place becomes a queued request, with no await between
        key = signature(model, request)
        loop = asyncio.get_running_loop()
        pending = _Pending(request, loop.create_future(), rows(request), timeout_s)
        if key is None or pending.rows >= self.max_batch_size:
            self.queued += 1  # waits for a slot like any queued request
            self.stats.on_queue_depth(model, self.queued)
            self._launch(model, [pending])
        else:
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = _Group()
                group.task = asyncio.create_task(self._collect(model, key, group))
            group.items.append(pending)
            self.queued += 1
            self.stats.on_queue_depth(model, self.queued)
            group.changed.set()
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout_s)
        except TimeoutError:
            if not pending.future.done():
                pending.future.cancel()  # skipped when its batch is formed
            raise AnswerTimeoutError(timeout_s) from None
        except asyncio.CancelledError:  # the caller has gone: its request is not sent upstream
            if not pending.future.done():
                pending.future.cancel()
            raise

    async def _collect(self, model: str, key: tuple[Any, ...], group: _Group) -> None:
        """Form batches for one signature until its queue is empty, then retire."""
        try:
            while group.items:
                deadline = group.items[0].enqueued + self.max_wait_s
                while sum(p.rows for p in group.items) < self.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    group.changed.clear()
                    try:
                        await asyncio.wait_for(group.changed.wait(), remaining)
                    except TimeoutError:
                        break
                await self.slots.acquire()  # requests keep joining while every slot is busy
                batch, size = [], 0
                while group.items and size + group.items[0].rows <= self.max_batch_size:
                    item = group.items.pop(0)
                    self.queued -= 1
                    if _still_wanted(item, time.monotonic()):  # callers gone or past their deadline are skipped
                        batch.append(item)
                        size += item.rows
                if not batch and group.items:  # a single request larger than what is left: send it alone
                    batch = [group.items.pop(0)]
                    self.queued -= 1
                self.stats.on_queue_depth(model, self.queued)
                if batch:
                    self._launch(model, batch, slot_held=True)
                else:
                    self.slots.release()
        finally:
            self.groups.pop(key, None)
            if group.items:  # raced with a late submit: hand them to a fresh collector
                fresh = self.groups[key] = _Group(items=group.items)
                fresh.task = asyncio.create_task(self._collect(model, key, fresh))

    def _launch(self, model: str, batch: list[_Pending], slot_held: bool = False) -> None:
        task = asyncio.create_task(self._run(model, batch, slot_held))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, model: str, batch: list[_Pending], slot_held: bool) -> None:
        if not slot_held:
            await self.slots.acquire()
            self.queued -= len(batch)
            self.stats.on_queue_depth(model, self.queued)
        try:
            await self._answer(model, batch)
        finally:
            self.slots.release()

    async def _answer(self, model: str, batch: list[_Pending]) -> None:
        """Run the members still wanted upstream and settle their futures.

        An error that may be one member's fault (``isolate``) is not handed to all: the batch is bisected and
        each half run again (one after the other, within the batch's slot) until the culprit is alone with its
        error and the innocent members have their answers. Any other error reaches every member.
        """
        now = time.monotonic()
        batch = [p for p in batch if _still_wanted(p, now)]
        if not batch:
            return
        try:
            parts = await self._call(model, batch)
        except Exception as exc:
            if len(batch) > 1 and self.isolate(exc):
                half = len(batch) // 2
                await self._answer(model, batch[:half])
                await self._answer(model, batch[half:])
                return
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        for pending, part in zip(batch, parts, strict=True):
            if not pending.future.done():
                pending.future.set_result(part)

    async def _call(self, model: str, batch: list[_Pending]) -> list[list[Tensor]]:
        """One upstream call for ``batch``, split back per member; timed for :meth:`service_estimate`."""
        self.stats.on_batch(model, sum(p.rows for p in batch))
        token = object()
        start = self._running[token] = time.monotonic()
        try:
            outputs = await self.run_batch(model, merge([p.request for p in batch]))
        finally:
            del self._running[token]
        elapsed = time.monotonic() - start
        self.service_s = elapsed if self.service_s == 0 else 0.8 * self.service_s + 0.2 * elapsed
        return split(outputs, [p.rows for p in batch])


def _still_wanted(pending: _Pending, now: float) -> bool:
    """Whether a queued request is still worth sending upstream: its caller is waiting and its deadline has
    not passed. One past its deadline is answered with the timeout now (its caller's own timer may be late)."""
    if pending.future.done():
        return False
    if now >= pending.deadline:
        pending.future.set_exception(AnswerTimeoutError(pending.timeout_s))
        return False
    return True
