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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("serving.batching")


@dataclass
class WorkItem:
    """One sample for one graph, and where its result goes."""

    inputs: Any  # one sample: an array, or a tuple of arrays for a graph with several inputs
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


async def collect_batch(
    queue: asyncio.Queue,
    max_size: int,
    max_wait_s: float,
    more_coming: Callable[[], bool] | None = None,
) -> list[Any]:
    """Wait for one item, then gather up to ``max_size`` items within ``max_wait_s``.

    Items already queued are always taken without waiting. After that the batch
    waits for more only while the deadline has not passed and ``more_coming()``
    (if given) says other requests are still on their way. Never loses an item:
    a get that completes as the deadline passes is kept.
    """
    batch = [await queue.get()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_wait_s
    while len(batch) < max_size:
        try:
            batch.append(queue.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - loop.time()
        if remaining <= 0 or (more_coming is not None and not more_coming()):
            break
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter}, timeout=remaining)
        if getter not in done:
            getter.cancel()
            # The get may have completed between the timeout and the cancel.
            await asyncio.wait({getter})
            if getter.cancelled():
                break
        batch.append(getter.result())
    return batch


RunFn = Callable[[Any], Sequence[np.ndarray]]


def _stack(inputs: list) -> Any:
    """Stack samples into a batch: arrays along a new axis 0; tuples of arrays (a graph
    with several inputs, e.g. the fused cascade's image and thresholds) element-wise."""
    if isinstance(inputs[0], tuple):
        return tuple(np.stack(parts) for parts in zip(*inputs))
    return np.stack(inputs)


class GraphWorker:
    """The queue and batching loop of one graph.

    ``run`` is called in ``executor`` with a stacked batch and returns the graph's
    outputs (each with the batch on axis 0). ``on_batch(size, queue_wait_s, run_s)``
    and ``on_item(latency_s)`` are metric hooks called from the event loop.
    """

    def __init__(
        self,
        name: str,
        run: RunFn,
        executor: Executor,
        max_batch_size: int,
        max_wait_s: float,
        more_coming: Callable[[], bool] | None = None,
        on_batch: Callable[[int, float, float], None] | None = None,
        on_item: Callable[[float], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
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
        self._on_queue_depth = on_queue_depth
        self._task: asyncio.Task | None = None
        # (batch size, perf_counter at hand-off to the executor) of the batch in ORT,
        # read by the service to estimate how long a new item would queue.
        self.running: tuple[int, float] | None = None

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
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if not item.future.done():
                item.future.cancel()

    async def submit(self, inputs: Any) -> tuple[np.ndarray, ...]:
        """Queue one sample and wait for its outputs (one array per graph output)."""
        if self._task is None or self._task.done():
            raise RuntimeError(f"batcher {self.name} is not running")
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(WorkItem(inputs, future))
        if self._on_queue_depth:
            self._on_queue_depth(self.queue.qsize())
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await collect_batch(self.queue, self._max_batch_size, self._max_wait_s, self._more_coming)
            if self._on_queue_depth:
                self._on_queue_depth(self.queue.qsize())
            # Clients that went away (cancelled futures) are not worth computing.
            batch = [item for item in batch if not item.future.done()]
            if not batch:
                continue
            started = time.perf_counter()
            self.running = (len(batch), started)
            try:
                stacked = _stack([item.inputs for item in batch])
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
                self.running = None
            finished = time.perf_counter()
            for j, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result(tuple(output[j] for output in outputs))
                if self._on_item:
                    self._on_item(finished - item.enqueued)
            if self._on_batch:
                oldest_wait = started - min(item.enqueued for item in batch)
                self._on_batch(len(batch), oldest_wait, finished - started)
