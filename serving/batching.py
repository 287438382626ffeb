"""Dynamic batching: one queue and one worker per graph.

Requests put a :class:`WorkItem` (one sample, no batch axis) into a graph's queue
and await its future. The graph's worker gathers items with :func:`collect_batch`,
runs the batch in a thread (ONNX Runtime releases the GIL, so the event loop keeps
accepting requests meanwhile) and resolves each future with that item's slice of
the outputs. A cascade re-enters the queue of the next stage graph with the features
it got back, so requests continuing past a stage are re-batched there.

Batching policy: a batch is cut when it reaches ``max_size``, when ``max_wait_s`` has
passed since the first item was taken, or — when ``more_coming`` is given — as soon
as nothing else is on its way. The last rule keeps a lone request from paying the
wait for nothing; under load the queue fills while the previous batch runs, so
batches grow without any waiting at all.

With a :class:`Settle`, "nothing else on its way" also means no client just answered is
expected back. Clients tend to send their next request as soon as they are answered (any
client that keeps a fixed number of requests in flight), and on a CPU the event loop's work
for them — writing the answers, reading and decoding the next requests — shares the cores
with ONNX Runtime's threads: started beside it, the next batch runs slower by far more than
the loop's CPU (every intrusion stalls one ORT thread and the other waits for it at the
operator's end). Waiting for them lets that work run first and the batch run on free cores
with everyone in it: with 32 connections the server ran two groups of 16 in turn, each
group's answers and next requests handled beside the other's run (full-width export: ORT
within the server 0.815 → 0.902 of raw at exit 1, paid back mostly by the loop's work now
done between batches; docs/request-path-profile.md, fourteenth session). Where ORT does not
run on the loop's cores (a GPU) the window is 0.

A request that finds the server otherwise idle (``LoneRun.alone()``)
skips the queue: it runs at once (``Graph.run_alone``), and for short graphs on the
event loop itself — two thread wake-ups (to the inference thread and back) cost as
much as a small graph's whole run on a small machine, and with nothing else to do
the loop has nothing better to run meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("serving.batching")


@dataclass
class WorkItem:
    """One sample for one graph, and where its result goes."""

    inputs: Any  # one sample: an array, or a tuple of arrays for a graph with several inputs
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Settle:
    """Clients just answered, expected back: the server's reason to let a batch wait.

    Every answer the service gives counts one client expected back, every request that enters
    it counts one fewer; the count lapses ``window_s`` after the last answer (clients that do
    not come back at once are not waited for). While clients are expected, a batch waits for
    them (:func:`collect_batch`) and a request is not taken to be alone on the server
    (InferenceService): it would otherwise run by itself while the rest of its clients' batch
    comes back. A client answered by itself (one connection) is back before the next request is
    judged, so lone requests are not affected. ``window_s`` 0: nothing is ever expected.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.expected = 0
        self._last_answer = 0.0

    def answered(self, now: float) -> None:
        """One client answered at ``now`` (``time.monotonic()``)."""
        if self.window_s > 0:
            self.expected += 1
            self._last_answer = now

    def arrived(self) -> None:
        if self.expected:
            self.expected -= 1

    def wait_s(self) -> float:
        """Seconds still worth waiting for the clients expected back (0: none expected)."""
        if not self.expected:
            return 0.0
        left = self.window_s - (time.monotonic() - self._last_answer)
        if left <= 0:
            self.expected = 0
            return 0.0
        return left


# uvloop's timers count whole milliseconds: a shorter wait would fire at once, again and again.
_MIN_SETTLE_WAIT_S = 0.001


async def collect_batch(
    queue: asyncio.Queue,
    max_size: int,
    max_wait_s: float,
    more_coming: Callable[[], bool] | None = None,
    settle: Settle | None = None,
    into: list | None = None,
) -> list[Any]:
    """Wait for one item, then gather up to ``max_size`` items within ``max_wait_s``.

    Items already queued are always taken without waiting. After that the batch
    waits for more only while the deadline has not passed and ``more_coming()``
    (if given) says other requests are still on their way or, with ``settle``, clients
    just answered are expected back. Never loses an item: a get that completes as the
    deadline passes is kept. ``into``: the list to gather in, so that what a batch holds
    while it waits can be seen (GraphWorker.waiting).
    """
    batch = into if into is not None else []
    batch.append(await queue.get())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait_s
    turned = False
    while len(batch) < max_size:
        try:
            batch.append(queue.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        wait = remaining
        if more_coming is not None and not more_coming():
            if settle is None or settle.window_s <= 0:
                break
            if not turned:
                # The handlers of the batch whose results were just handed out run in the
                # loop's next turn, and their answers are clients expected back: count them.
                turned = True
                await asyncio.sleep(0)
                continue
            left = settle.wait_s()
            if left <= 0:
                break
            wait = min(remaining, max(left, _MIN_SETTLE_WAIT_S))
        getter = asyncio.ensure_future(queue.get())
        try:
            done, _ = await asyncio.wait({getter}, timeout=wait)
        except asyncio.CancelledError:
            # Stopped mid-wait: an item the getter already took joins the batch, which the stopper
            # cancels (left in the getter, its request waited forever); one not yet taken stays queued.
            getter.cancel()
            if getter.done() and not getter.cancelled():
                batch.append(getter.result())
            raise
        if getter not in done:
            getter.cancel()
            # The get may have completed between the timeout and the cancel.
            await asyncio.wait({getter})
            if getter.cancelled():
                continue  # the deadline, what is on its way and who is expected back: checked again
        batch.append(getter.result())
    return batch


RunFn = Callable[[Any], Sequence[np.ndarray]]


def _stack(inputs: list, pad_to: int | None = None) -> Any:
    """Stack samples into a batch: arrays along a new axis 0; tuples of arrays (a graph
    with several inputs, e.g. the fused cascade's image and thresholds) element-wise.
    ``pad_to``: zero rows after the samples up to that many (the outputs' first
    ``len(inputs)`` rows are the samples')."""
    if isinstance(inputs[0], tuple):
        return tuple(_stack(list(parts), pad_to) for parts in zip(*inputs))
    if pad_to is None or pad_to <= len(inputs):
        return np.stack(inputs)
    batch = np.zeros((pad_to, *np.shape(inputs[0])), dtype=np.asarray(inputs[0]).dtype)
    batch[: len(inputs)] = inputs
    return batch


def _one(inputs: Any) -> Any:
    """One sample as a batch of one: a view with a new axis 0 (tuples element-wise). Not
    ``np.stack``, whose several Python-level steps a lone request pays cold after the last ORT
    run (~45 µs of its 0.26 ms before the run on the full-width model, against ~1 µs hot)."""
    if isinstance(inputs, tuple):
        return tuple(_one(part) for part in inputs)
    return np.asarray(inputs)[None]


class HeldAnswers(Protocol):
    """Where the server holds its answers' writes while a batch's handlers run, so that a batch's
    answers leave together (serving/transport.py's ``WriteHold``)."""

    def hold(self, requests: int) -> None:
        """A batch's results were just handed to ``requests`` requests, whose handlers the event
        loop resumes next, in order."""

    def send_held(self) -> None:
        """Send what is held now: the event loop is about to block."""


# How many of a graph's latest lone runs decide whether the next one runs on the event loop.
LONE_RUNS_REMEMBERED = 16


@dataclass
class LoneRun:
    """How a request that finds the server otherwise idle runs: past the queue, on its own.

    ``inline``: on the event loop itself, for graphs whose run takes ``max_inline_s`` at most —
    judged by the fastest of the last :data:`LONE_RUNS_REMEMBERED` lone runs (the start-up
    calibration's, then live ones): the graph's own cost, which a stall of the host only adds to.
    One fast run among them keeps the graph on the loop; a graph that stays slower than the limit
    leaves it. A run in the inference thread is timed on the loop, hand-offs included (~0.1–0.2 ms
    more than the run itself): a graph just past the limit comes back a little later than it left.
    Decided once at start-up, a stall through all of the calibration's runs sent a server's
    main-exit lone requests to the inference thread for the process's whole life (a whole
    benchmark run's round 2, 2026-12-01: fastest calibration run past 10 ms, typical 6–7 ms).
    """

    run: RunFn  # the graph's lone-request run (Graph.run_alone: one thread for small models)
    alone: Callable[[], bool]  # nothing else admitted, queued or running
    inline: bool = False
    max_inline_s: float | None = None  # None: ``inline`` stays as set
    recent: deque = field(default_factory=lambda: deque(maxlen=LONE_RUNS_REMEMBERED))

    def observe(self, seconds: float) -> None:
        """One lone run's time (calibration or live): where the next lone request runs."""
        self.recent.append(seconds)
        if self.max_inline_s is not None:
            self.inline = min(self.recent) <= self.max_inline_s


class GraphWorker:
    """The queue and batching loop of one graph.

    ``run`` is called in ``executor`` with a stacked batch and returns the graph's
    outputs (each with the batch on axis 0). ``lone``: how a request that finds the
    server idle runs (see :class:`LoneRun`). ``pad_to``: every batch padded to that size,
    one input shape for the graph's session (GPU providers: ``Graph.pads_batches``); a lone
    request's batch of 1 is not. ``on_batch(size, queue_wait_s, run_s, rows)`` and
    ``on_item(latency_s)`` are metric hooks called from the event loop (``size``: requests;
    ``rows``: what ORT ran, padding included, which is what the run's time depends on).
    ``answers``: where the server holds its answers' writes (:class:`HeldAnswers`), told when a
    batch's results were handed out and before a lone run blocks the event loop. ``settle``:
    the clients just answered, which a batch waits for (:class:`Settle`).
    """

    def __init__(
        self,
        name: str,
        run: RunFn,
        executor: Executor,
        max_batch_size: int,
        max_wait_s: float,
        more_coming: Callable[[], bool] | None = None,
        on_batch: Callable[[int, float, float, int], None] | None = None,
        on_item: Callable[[float], None] | None = None,
        *,
        answers: HeldAnswers | None = None,
        lone: LoneRun | None = None,
        pad_to: int | None = None,
        settle: Settle | None = None,
    ) -> None:
        self.name = name
        self.queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        self._run = run
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._more_coming = more_coming
        self._on_batch = on_batch
        self._on_item = on_item
        self._answers = answers
        self._settle = settle
        self.lone = lone
        self.pad_to = pad_to
        self._task: asyncio.Task | None = None
        # Items taken from the queue for the batch being gathered: still waiting, like the queue's.
        self.collecting: list[WorkItem] = []
        # (rows, perf_counter at hand-off to ORT) of every batch in ORT now (a lone
        # request's run may overlap the loop's), read by the service to estimate queueing.
        self.running: list[tuple[int, float]] = []

    def waiting(self) -> int:
        """Items not yet in ORT: queued, or in the batch being gathered."""
        return self.queue.qsize() + len(self.collecting)

    def rows(self, requests: int) -> int:
        """The rows ORT runs for a queued batch of ``requests`` (padding included)."""
        return max(requests, self.pad_to or 0)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the loop; pending items fail with CancelledError."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        pending, self.collecting = self.collecting, []  # a batch being gathered when stopped
        while not self.queue.empty():
            pending.append(self.queue.get_nowait())
        for item in pending:
            if not item.future.done():
                item.future.cancel()

    async def submit(self, inputs: Any, *, arrivals_counted: bool = False) -> tuple[np.ndarray, ...]:
        """Run one sample and return its outputs (one array per graph output).

        ``arrivals_counted``: ``lone.alone`` already counts every request read with this one
        but not yet admitted (the HTTP protocol's own path: InferenceService.arrived), so
        "alone" can be decided at once; otherwise a loop turn lets them be admitted first.
        """
        if self._task is None or self._task.done():
            raise RuntimeError(f"batcher {self.name} is not running")
        if self.lone is not None and self.lone.alone():
            # Requests read in the same loop turn as this one must be counted before "alone" is
            # decided, else under load every request would find the server idle after the
            # previous one and none would batch. Where nothing counts them, they are admitted
            # during one yielded turn (~12 µs of a lone request, cold). Not alone before the
            # check: under load, the common case, no yield at all.
            if not arrivals_counted:
                await asyncio.sleep(0)
            if arrivals_counted or self.lone.alone():
                return await self._run_alone(self.lone, inputs)
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(WorkItem(inputs, future))
        return await future

    async def _run_alone(self, lone: LoneRun, inputs: Any) -> tuple[np.ndarray, ...]:
        batch = _one(inputs)
        entry = (1, time.perf_counter())
        self.running.append(entry)
        try:
            if lone.inline:
                if self._answers is not None:
                    # Answers held for a batch whose handlers ran before this one (a request that
                    # left the batch at an earlier stage) must not wait for this run.
                    self._answers.send_held()
                outputs = lone.run(batch)
            else:
                outputs = await asyncio.get_running_loop().run_in_executor(self._executor, lone.run, batch)
        finally:
            self.running.remove(entry)
        run_s = time.perf_counter() - entry[1]
        # After the answer is written (the request does not yield to the loop on its way
        # there): nobody waits for the metrics and the time models, and anything that reads
        # them later — the next request included — runs after this.
        asyncio.get_running_loop().call_soon(self._after_lone_run, lone, run_s)
        return tuple(output[0] for output in outputs)

    def _after_lone_run(self, lone: LoneRun, run_s: float) -> None:
        lone.observe(run_s)
        if self._on_batch:
            self._on_batch(1, 0.0, run_s, 1)
        if self._on_item:
            self._on_item(run_s)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await collect_batch(
                self.queue, self._max_batch_size, self._max_wait_s, self._more_coming, self._settle, self.collecting
            )
            self.collecting = []  # the batch is ORT's now (``running``)
            # Clients that went away (cancelled futures) are not worth computing.
            batch = [item for item in batch if not item.future.done()]
            if not batch:
                continue
            started = time.perf_counter()
            entry = (self.rows(len(batch)), started)
            self.running.append(entry)
            try:
                stacked = _stack([item.inputs for item in batch], self.pad_to)
                outputs = await loop.run_in_executor(self._executor, self._run, stacked)
            except asyncio.CancelledError:
                for item in batch:
                    if not item.future.done():
                        item.future.cancel()
                raise
            except Exception as exc:  # a broken batch fails its requests, not the worker
                log.exception("batch of %d on %s failed", len(batch), self.name)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self.running.remove(entry)
            finished = time.perf_counter()
            for j, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result(tuple(output[j] for output in outputs))
                if self._on_item:
                    self._on_item(finished - item.enqueued)
            if self._answers is not None:
                self._answers.hold(len(batch))
            if self._on_batch:
                oldest_wait = started - min(item.enqueued for item in batch)
                self._on_batch(len(batch), oldest_wait, finished - started, entry[0])
