"""The inference service: runs a :class:`~serving.policy.Plan` on the model's graphs.

Owns one batching worker per graph (full paths and stages), the thread pool they
run ONNX Runtime in, admission control (a bounded number of requests in flight,
503 beyond it) and the per-graph latency trackers that feed ``budget_ms``.
HTTP-agnostic: the app decodes images and builds responses around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .batching import GraphWorker
from .errors import Overloaded
from .latency import LatencyTracker
from .metrics import ServingMetrics
from .policy import CostTable, Plan, PolicyParams, gflops_spent, is_confident, plan_request, softmax
from .runtime import Graph, ModelRuntime


@dataclass
class Outcome:
    """The result of running one plan on one input."""

    exit: int
    probs: np.ndarray
    exits_evaluated: list[int]
    gflops: float
    seconds: float  # enqueue of the first graph → result of the last


@dataclass
class Ticket:
    """An admitted request. ``preparing`` until it submits its first graph input."""

    preparing: bool = True
    _service: "InferenceService | None" = field(default=None, repr=False)

    def started(self) -> None:
        if self.preparing and self._service is not None:
            self.preparing = False
            self._service._preparing -= 1


class InferenceService:
    """Batched, admission-controlled execution of plans on a loaded :class:`ModelRuntime`."""

    def __init__(
        self,
        runtime: ModelRuntime,
        metrics: ServingMetrics,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 2.0,
        queue_size: int = 256,
        inference_workers: int = 1,
        latency_window: int = 512,
        latency_percentile: float = 95.0,
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.costs = CostTable.from_manifest(runtime.manifest)
        self.queue_size = queue_size
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000.0
        self._executor = ThreadPoolExecutor(max_workers=inference_workers, thread_name_prefix="eed-ort")
        self.trackers = {g.name: LatencyTracker(latency_window, latency_percentile) for g in runtime.graphs}
        self._inflight = 0
        self._preparing = 0
        self.exit_workers = [self._worker(g) for g in runtime.exits]
        self.stage_workers = [self._worker(g) for g in runtime.stages]

    @classmethod
    def from_settings(cls, runtime: ModelRuntime, metrics: ServingMetrics, settings) -> "InferenceService":
        return cls(
            runtime,
            metrics,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            queue_size=settings.queue_size,
            inference_workers=settings.inference_workers,
            latency_window=settings.latency_window,
            latency_percentile=settings.latency_percentile,
        )

    def _worker(self, graph: Graph) -> GraphWorker:
        exit_label, kind = str(graph.exit), graph.kind
        batch_size = self.metrics.batch_size.labels(exit_label, kind)
        inference = self.metrics.inference_latency.labels(exit_label, kind)
        queue_wait = self.metrics.queue_wait.labels(exit_label, kind)
        depth = self.metrics.queue_depth.labels(exit_label, kind)
        tracker = self.trackers[graph.name]

        def on_batch(size: int, wait_s: float, run_s: float) -> None:
            batch_size.observe(size)
            queue_wait.observe(wait_s)
            inference.observe(run_s)

        return GraphWorker(
            graph.name,
            graph.run,
            self._executor,
            self._max_batch_size,
            self._max_wait_s,
            more_coming=lambda: self._preparing > 0,
            on_batch=on_batch,
            on_item=tracker.observe,
            on_queue_depth=depth.set,
        )

    # -- lifecycle -----------------------------------------------------------------

    def seed_latency(self, timings: dict[str, list[float]]) -> None:
        """Seed every graph's latency window from start-up calibration."""
        for name, samples in timings.items():
            self.trackers[name].seed(samples)
        self.publish_estimates()

    async def start(self) -> None:
        """Start every graph's batching loop (call from the event loop)."""
        for worker in (*self.exit_workers, *self.stage_workers):
            worker.start()

    async def stop(self) -> None:
        """Stop the batching loops and the inference threads."""
        for worker in (*self.exit_workers, *self.stage_workers):
            await worker.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    # -- admission -----------------------------------------------------------------

    @contextlib.contextmanager
    def admit(self) -> Iterator[Ticket]:
        """Admit one request or raise Overloaded (503 + Retry-After) when full."""
        if self._inflight >= self.queue_size:
            raise Overloaded(
                f"server is at capacity ({self.queue_size} requests in flight); retry shortly",
                retry_after_s=1,
                queue_size=self.queue_size,
            )
        self._inflight += 1
        self._preparing += 1
        self.metrics.inflight.set(self._inflight)
        ticket = Ticket(_service=self)
        try:
            yield ticket
        finally:
            ticket.started()  # no-op unless it failed before reaching the model
            self._inflight -= 1
            self.metrics.inflight.set(self._inflight)

    @property
    def inflight(self) -> int:
        return self._inflight

    # -- latency estimates -----------------------------------------------------------

    def latency_estimates_ms(self) -> tuple[list[float], list[float]]:
        """Per exit: (full-path estimate, cascade-to-this-exit estimate), in ms."""
        single = [self.trackers[g.name].estimate() * 1e3 for g in self.runtime.exits]
        stages = [self.trackers[g.name].estimate() * 1e3 for g in self.runtime.stages]
        return single, [float(x) for x in np.cumsum(stages)]

    def publish_estimates(self) -> None:
        """Copy the current estimates into the Prometheus gauges."""
        single, cascade = self.latency_estimates_ms()
        for i, (s, c) in enumerate(zip(single, cascade), start=1):
            self.metrics.latency_estimate.labels(str(i), "single").set(s / 1e3)
            self.metrics.latency_estimate.labels(str(i), "cascade").set(c / 1e3)

    # -- execution -------------------------------------------------------------------

    def plan(self, params: PolicyParams) -> Plan:
        """Plan a request against this model's costs and current latency estimates."""
        if params.budget_ms is not None:
            single, cascade = self.latency_estimates_ms()
            return plan_request(params, self.costs, single, cascade)
        return plan_request(params, self.costs)

    async def run(self, x: np.ndarray, plan: Plan, ticket: Ticket | None = None) -> Outcome:
        """Run ``plan`` on one preprocessed input (C, H, W) and return the answer."""
        if ticket is not None:
            ticket.started()
        started = time.perf_counter()
        evaluated: list[int] = []
        if plan.mode == "single":
            (logits,) = await self.exit_workers[plan.exit - 1].submit(x)
            probs = softmax(logits)
            evaluated.append(plan.exit)
        else:
            features = x
            for number in range(1, plan.exit + 1):
                outputs = await self.stage_workers[number - 1].submit(features)
                probs = softmax(outputs[0])
                evaluated.append(number)
                if number == plan.exit or is_confident(probs, plan.threshold):
                    break
                features = outputs[1]
        return Outcome(
            exit=evaluated[-1],
            probs=probs,
            exits_evaluated=evaluated,
            gflops=gflops_spent(self.costs, plan.mode, evaluated),
            seconds=time.perf_counter() - started,
        )
