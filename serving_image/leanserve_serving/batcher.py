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

Ragged batching (opt-in, ``pad_inputs``: input name -> pad value, as Triton's
ragged batching or a Hugging Face pipeline padding to the batch's longest): a
request whose named inputs are all of rank 2 ([batch, seq]) and share one length
batches with requests that differ from it only in that length. Its signature
ignores dimension 1 of those inputs; at merge each member is right-padded with
the input's value to the batch's longest length, and on the way back an output
that carries the sequence axis (dimension 1 of the padded length, declared of
free size by the model) is cut back to each member's own length. A request that
cannot be padded (a named input of another rank, of BYTES, whose pad value its
datatype cannot hold, or named inputs of different lengths) keeps its exact
signature: it batches as it did before, only with requests of its very shapes.
Padding is bounded (:class:`PaddedSize`): a request joins a batch being formed
only while the padded batch holds at most :data:`MAX_PADDING_RATIO` times the
elements its members brought (one 4096-token request never drags 31 one-token
requests to 4096 each), so a merged batch's padded inputs stay within twice
the bytes its members sent (each within the sidecar's ``max_body_bytes``); the
first request that would break it starts the next batch.
Padding is right only for models that ignore padded positions (an attention
mask padded with 0): that is the operator's promise when it names the inputs.

Admission is decided before a request is even read (:meth:`DynamicBatcher.admit`):
a place is refused when ``max_queue`` requests wait, or when the expected wait
(the batches ahead at the recent service time) exceeds ``max_queue_wait_s``.

The batcher knows no transport (as MLServer's adaptive batcher and Ray Serve's
``@serve.batch`` do not): it raises its own :class:`BatchError` subclasses, and
the sidecar chooses the HTTP status of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson

from leanserve_serving.recent import RecentMean
from leanserve_serving.tensors import InferRequest, Tensor, TensorSpec, binary_size

T = TypeVar("T")

#: Runs one merged request upstream; returns the merged outputs.
RunBatch = Callable[[str, InferRequest], Awaitable[list[Tensor]]]

#: Inputs padded along dimension 1 to batch requests of different lengths, each with its pad value.
PadInputs = Mapping[str, float | int]

#: The most elements a padded batch may hold per element its members brought (its padded inputs' rows times
#: the longest length, over their rows times their own lengths): padding at most doubles a batch's size.
MAX_PADDING_RATIO = 2.0

#: Stands in a padded signature for the free dimension 1 of a padded input (no shape holds a string).
PADDED = "*"


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


def padded_length(request: InferRequest, pad_inputs: PadInputs | None) -> int | None:
    """The length (dimension 1) a request's padded inputs share, or None when it cannot be padded: no input
    named in ``pad_inputs``, one of another rank than 2, of BYTES or of a datatype its pad value does not fit,
    or named inputs of different lengths (such a request keeps its exact signature)."""
    if not pad_inputs:
        return None
    lengths = set()
    for tensor in request.inputs:
        if tensor.name not in pad_inputs:
            continue
        if len(tensor.shape) != 2 or not _holds(tensor.data.dtype, pad_inputs[tensor.name]):
            return None
        lengths.add(tensor.shape[1])
    return lengths.pop() if len(lengths) == 1 else None


def _holds(dtype: np.dtype[Any], value: float) -> bool:
    """Whether ``value`` is a value of ``dtype`` (a float rounds; an integer or boolean must be exact)."""
    if np.issubdtype(dtype, np.floating):
        return bool(abs(value) <= np.finfo(dtype).max)
    if dtype == np.bool_:
        return value in (0, 1)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(value).is_integer() and info.min <= value <= info.max
    return False  # BYTES (object) and anything else: no number pads it


def signature(model: str, request: InferRequest, pad_inputs: PadInputs | None = None) -> tuple[Any, ...] | None:
    """What a request may batch with, or None when it cannot batch (a scalar input).

    With ``pad_inputs``, a request that can be padded (:func:`padded_length`) has :data:`PADDED` for
    dimension 1 of its padded inputs: it batches with requests of other lengths. Without, or for a request
    that cannot be padded, the signature is exactly the unpadded one.
    """
    if any(len(t.shape) == 0 for t in request.inputs):
        return None
    if padded_length(request, pad_inputs) is not None:
        assert pad_inputs is not None  # a length implies named inputs
        inputs = tuple(
            sorted((t.name, t.datatype, (PADDED,) if t.name in pad_inputs else t.shape[1:]) for t in request.inputs)
        )
    else:
        inputs = tuple(sorted((t.name, t.datatype, t.shape[1:]) for t in request.inputs))
    outputs = tuple(request.outputs) if request.outputs is not None else None
    params = orjson.dumps(request.parameters, option=orjson.OPT_SORT_KEYS) if request.parameters else b""
    return (model, inputs, outputs, params)


def rows(request: InferRequest) -> int:
    return request.inputs[0].shape[0] if request.inputs[0].shape else 1


def payload_bytes(request: InferRequest) -> int:
    """The bytes a request's inputs take on the binary hop upstream (:func:`binary_size` of each)."""
    return sum(binary_size(t.datatype, t.data) for t in request.inputs)


def merge(requests: list[InferRequest], pad_inputs: PadInputs | None = None) -> InferRequest:
    """One request whose inputs are the given requests' inputs concatenated along dimension 0; an input named
    in ``pad_inputs`` whose parts differ in length is first right-padded with its value along dimension 1 to
    the longest. The requests themselves are left as they are (the exact cache keys on them)."""
    first = requests[0]
    if len(requests) == 1:
        return first
    merged = []
    for tensor in first.inputs:
        parts = [next(t for t in r.inputs if t.name == tensor.name).data for r in requests]
        if pad_inputs and tensor.name in pad_inputs and _ragged(parts):
            data = _padded(parts, pad_inputs[tensor.name])
        else:
            data = np.concatenate(parts, axis=0)
        merged.append(Tensor(tensor.name, tensor.datatype, tuple(data.shape), data))
    return InferRequest(inputs=merged, parameters=first.parameters, outputs=first.outputs)


def _ragged(parts: list[np.ndarray]) -> bool:
    return all(p.ndim == 2 for p in parts) and len({p.shape[1] for p in parts}) > 1


def _padded(parts: list[np.ndarray], value: float) -> np.ndarray:
    """The parts stacked along dimension 0 in one array of the longest length, filled with ``value`` beyond
    each part's own (one allocation, each part copied once, as ``np.concatenate`` would)."""
    longest = max(p.shape[1] for p in parts)
    data = np.full((sum(p.shape[0] for p in parts), longest), value, dtype=parts[0].dtype)
    start = 0
    for part in parts:
        data[start : start + part.shape[0], : part.shape[1]] = part
        start += part.shape[0]
    return data


def padding_elements(sizes: list[int], lengths: list[int | None]) -> int:
    """Pad values one padded input of a batch gets: each member's rows times its shortfall to the longest."""
    if any(length is None for length in lengths):
        return 0
    own = [n for n in lengths if n is not None]
    longest = max(own)
    return sum(size * (longest - n) for size, n in zip(sizes, own, strict=True))


def split(
    outputs: list[Tensor],
    sizes: list[int],
    lengths: Sequence[int | None] | None = None,
    sequence_outputs: Collection[str] | None = None,
) -> list[list[Tensor]]:
    """Cut merged outputs back into per-request outputs by row counts (:class:`UpstreamShapeError` when an
    output is not batched along the merged rows).

    ``lengths`` are the members' own padded lengths (a padded batch): an output of rank 2 or more whose
    dimension 1 is the batch's longest length carries the sequence axis, and each member gets it cut back
    to its own length (a token-level model answers a padded request with as many positions as it sent).
    ``sequence_outputs`` names the outputs that may carry it (those the model declares of free dimension 1):
    an output of fixed dimension 1 ([batch, 2] logits) is never cut, whatever the longest length; None
    (the model's outputs unknown): any output may.
    """
    total = sum(sizes)
    for out in outputs:
        if not out.shape or out.shape[0] != total:
            raise UpstreamShapeError(out.name, out.shape, total)
    own: list[int] = []  # each member's own length, when the batch was padded
    if lengths is not None and None not in lengths and len(set(lengths)) > 1:
        own = [n for n in lengths if n is not None]
    cut = {
        out.name
        for out in outputs
        if own
        and len(out.shape) >= 2
        and out.shape[1] == max(own)
        and (sequence_outputs is None or out.name in sequence_outputs)
    }
    result: list[list[Tensor]] = []
    start = 0
    for i, size in enumerate(sizes):
        part = []
        for out in outputs:
            data = out.data[start : start + size]
            if out.name in cut:
                data = np.ascontiguousarray(data[:, : own[i]])
            part.append(Tensor(out.name, out.datatype, tuple(data.shape), data))
        result.append(part)
        start += size
    return result


def sequence_outputs_of(specs: Sequence[TensorSpec] | None) -> frozenset[str] | None:
    """The outputs that may carry a padded sequence axis: those the model declares of free dimension 1
    (None, any output, when its outputs are unknown)."""
    if specs is None:
        return None
    return frozenset(s.name for s in specs if len(s.shape) >= 2 and s.shape[1] == -1)


@dataclass
class PaddedSize:
    """A batch being formed, as padding sees it: its rows, the elements its members brought (rows times
    their own length) and its longest length."""

    rows: int = 0
    brought: int = 0
    longest: int = 0

    def admits(self, rows: int, length: int | None) -> bool:
        """Whether a member of ``rows`` rows and padded ``length`` may join: the padded batch then holds at
        most :data:`MAX_PADDING_RATIO` times the elements its members brought. Always true for a request
        that is not padded (no length) and for the first member (sent alone if need be)."""
        if length is None or self.rows == 0:
            return True
        padded = (self.rows + rows) * max(self.longest, length)
        return padded <= MAX_PADDING_RATIO * (self.brought + rows * length)

    def add(self, rows: int, length: int | None) -> None:
        if length is not None:
            self.rows += rows
            self.brought += rows * length
            self.longest = max(self.longest, length)


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
    length: int | None = None
    """Its padded inputs' own length (dimension 1) when its signature is a padded one; None otherwise."""
    nbytes: int = 0
    """Its inputs' bytes on the hop (:func:`payload_bytes`); 0 when the batcher has no byte cap."""
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        return self.enqueued + self.timeout_s


@dataclass
class _Group:
    items: list[_Pending] = field(default_factory=list)
    rows: int = 0
    """The rows of ``items`` (kept as they join and leave: the collector is not woken to count them)."""
    nbytes: int = 0
    """The hop bytes of ``items``, kept the same way."""
    full: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when ``rows`` reaches the batch size or ``nbytes`` the byte cap: the collector sleeps until then or
    its oldest's deadline."""
    task: asyncio.Task[None] | None = None

    def add(self, pending: _Pending, max_batch_size: int, max_batch_bytes: float) -> None:
        self.items.append(pending)
        self.rows += pending.rows
        self.nbytes += pending.nbytes
        if self.filled(max_batch_size, max_batch_bytes):
            self.full.set()

    def filled(self, max_batch_size: int, max_batch_bytes: float) -> bool:
        return self.rows >= max_batch_size or self.nbytes >= max_batch_bytes

    def pop(self) -> _Pending:
        item = self.items.pop(0)
        self.rows -= item.rows
        self.nbytes -= item.nbytes
        return item


@dataclass
class BatchStats:
    """Hooks the sidecar's metrics hang on."""

    on_batch: Callable[[str, int], None] = lambda model, size: None
    on_queue_depth: Callable[[str, int], None] = lambda model, depth: None
    on_padding: Callable[[str, int], None] = lambda model, elements: None
    """Pad values added to a batch sent upstream (over all its padded inputs); called only when some were."""


class DynamicBatcher:
    """Batches requests per signature and runs them through ``run_batch`` with bounded concurrency.

    ``isolate`` says whether a failed batch's error may be one member's fault (the sidecar: a client error
    from the upstream); such a batch is bisected rather than failed whole.

    ``pad_inputs`` turns on ragged batching (see the module's doc); ``declared_outputs`` gives a model's
    declared outputs when they are known (the sidecar read them to check the request): a padded batch's
    outputs are cut back per member only along a dimension 1 the model declares free.
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
        pad_inputs: PadInputs | None = None,
        declared_outputs: Callable[[str], Sequence[TensorSpec] | None] = lambda model: None,
        max_batch_bytes: float = math.inf,
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
        self.pad_inputs: dict[str, float | int] = dict(pad_inputs or {})
        self.declared_outputs = declared_outputs
        self.max_batch_bytes = max_batch_bytes
        self.groups: dict[tuple[Any, ...], _Group] = {}
        self.queued = 0
        self.reserved = 0
        """Places taken by requests being read, decoded and checked: they count against ``max_queue``."""
        self.service = RecentMean()
        """Recent seconds per upstream call (of the successful ones); 0 until the first."""
        self._running: dict[object, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def service_estimate(self) -> float:
        """Seconds one batch takes upstream: the recent average, or longer while a call in flight has already
        taken longer (a frozen model server shows here before any call ends)."""
        oldest = min(self._running.values(), default=None)
        running = time.monotonic() - oldest if oldest is not None else 0.0
        return max(self.service.value, running)

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
        key = signature(model, request, self.pad_inputs)
        length = padded_length(request, self.pad_inputs) if key is not None else None
        loop = asyncio.get_running_loop()
        nbytes = payload_bytes(request) if self.max_batch_bytes < math.inf else 0
        pending = _Pending(request, loop.create_future(), rows(request), timeout_s, length, nbytes)
        if key is None or pending.rows >= self.max_batch_size:
            self.queued += 1  # waits for a slot like any queued request
            self.stats.on_queue_depth(model, self.queued)
            self._launch(model, [pending])
        else:
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = _Group()
                group.task = asyncio.create_task(self._collect(model, key, group))
            group.add(pending, self.max_batch_size, self.max_batch_bytes)
            self.queued += 1
            self.stats.on_queue_depth(model, self.queued)
        # The caller waits on its future itself, with a timer that fails it at the deadline (wait_for and shield
        # would wrap it in two more futures and a task step per request). A caller that goes away cancels the
        # future with it; either way the future is done, and its batch skips it.
        timer = loop.call_later(timeout_s, _expire, pending.future, timeout_s)
        try:
            return await pending.future
        finally:
            timer.cancel()

    async def run_alone(
        self, model: str, call: Callable[[], Awaitable[T]], timeout_s: float, place: Place | None = None
    ) -> T:
        """Run one request's own upstream ``call``, merged with nothing (the sidecar's pass-through when batching
        is off), within the batcher's bounds all the same: it queues in ``place`` (:meth:`admit`'s) for one of
        the ``concurrency`` upstream slots; a caller that goes away or whose ``timeout_s`` passes while it
        queues is never sent; its time feeds :meth:`service_estimate`, so admission refuses what would wait
        too long, as for batched requests. Counted as a batch of one.

        Once sent, the call keeps its slot until the upstream answers, even when its caller has gone or timed
        out (:class:`AnswerTimeoutError`): the slot stands for work the upstream is doing, so the upstream is
        never handed more than ``concurrency`` calls at once, as with batches."""
        (place or self.admit()).release()
        deadline = time.monotonic() + timeout_s
        self.queued += 1
        self.stats.on_queue_depth(model, self.queued)
        try:
            async with asyncio.timeout(timeout_s):
                await self.slots.acquire()
        except TimeoutError:
            raise AnswerTimeoutError(timeout_s) from None
        finally:
            self.queued -= 1
            self.stats.on_queue_depth(model, self.queued)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()
        task = loop.create_task(self._alone(model, call, answer))  # gives the slot back when the upstream answers
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        timer = loop.call_later(max(0.0, deadline - time.monotonic()), _expire, answer, timeout_s)
        try:
            return await answer  # a caller cancelled here cancels ``answer`` only: the call goes on
        finally:
            timer.cancel()

    async def _alone(self, model: str, call: Callable[[], Awaitable[T]], answer: asyncio.Future[T]) -> None:
        """One passed-through call in the slot :meth:`run_alone` took; its answer to the caller, if still waiting."""
        self.stats.on_batch(model, 1)
        token = object()
        start = self._running[token] = time.monotonic()
        try:
            result = await call()
        except Exception as exc:
            if not answer.done():
                answer.set_exception(exc)
        else:
            self.service.add(time.monotonic() - start)
            if not answer.done():
                answer.set_result(result)
        finally:
            del self._running[token]
            self.slots.release()

    async def _collect(self, model: str, key: tuple[Any, ...], group: _Group) -> None:
        """Form batches for one signature until its queue is empty, then retire."""
        try:
            while group.items:
                remaining = group.items[0].enqueued + self.max_wait_s - time.monotonic()
                if remaining > 0 and not group.filled(self.max_batch_size, self.max_batch_bytes):
                    group.full.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(group.full.wait(), remaining)
                await self.slots.acquire()  # requests keep joining while every slot is busy
                batch, size, nbytes, padded = [], 0, 0, PaddedSize()
                while (
                    group.items
                    and size + group.items[0].rows <= self.max_batch_size
                    and (not batch or nbytes + group.items[0].nbytes <= self.max_batch_bytes)
                    and padded.admits(group.items[0].rows, group.items[0].length)
                ):
                    item = group.pop()
                    self.queued -= 1
                    if _still_wanted(item, time.monotonic()):  # callers gone or past their deadline are skipped
                        batch.append(item)
                        size += item.rows
                        nbytes += item.nbytes
                        padded.add(item.rows, item.length)
                if not batch and group.items:  # a single request larger than what is left: send it alone
                    batch = [group.pop()]
                    self.queued -= 1
                self.stats.on_queue_depth(model, self.queued)
                if batch:
                    self._launch(model, batch, slot_held=True)
                else:
                    self.slots.release()
        finally:
            self.groups.pop(key, None)
            if group.items:  # raced with a late submit: hand them to a fresh collector
                fresh = self.groups[key] = _Group(items=group.items, rows=group.rows, nbytes=group.nbytes)
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
        sizes, lengths = [p.rows for p in batch], [p.length for p in batch]
        self.stats.on_batch(model, sum(sizes))
        if pad := padding_elements(sizes, lengths):
            named = sum(1 for t in batch[0].request.inputs if t.name in self.pad_inputs)
            self.stats.on_padding(model, pad * named)
        token = object()
        start = self._running[token] = time.monotonic()
        try:
            outputs = await self.run_batch(model, merge([p.request for p in batch], self.pad_inputs))
        finally:
            del self._running[token]
        self.service.add(time.monotonic() - start)
        if not self.pad_inputs:
            return split(outputs, sizes)
        return split(outputs, sizes, lengths, sequence_outputs_of(self.declared_outputs(model)))


def _expire(future: asyncio.Future[Any], timeout_s: float) -> None:
    """A request's timer: no answer within ``timeout_s``, so :class:`AnswerTimeoutError` (its batch, not formed
    yet, skips it; one in flight answers nobody)."""
    if not future.done():
        future.set_exception(AnswerTimeoutError(timeout_s))


def _still_wanted(pending: _Pending, now: float) -> bool:
    """Whether a queued request is still worth sending upstream: its caller is waiting and its deadline has
    not passed. One past its deadline is answered with the timeout now (its caller's own timer may be late)."""
    if pending.future.done():
        return False
    if now >= pending.deadline:
        pending.future.set_exception(AnswerTimeoutError(pending.timeout_s))
        return False
    return True
