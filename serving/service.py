"""The inference service: runs a :class:`~serving.policy.Plan` on the model's graphs.

Owns one batching worker per graph (full paths and stages), the thread pool they
run ONNX Runtime in, admission control (a bounded number of requests in flight,
503 beyond it) and what deadlines need: a service-time model per graph
(:mod:`serving.latency`), the present queueing delay computed from the queues, and
idle probes that keep every graph's estimate current. HTTP-agnostic: the app
decodes images and builds responses around it.

Deadlines (``budget_ms``) run as anytime cascades: stage 1 always runs (so there is
always an answer); before each further stage the service predicts when that stage
would finish — queueing now plus its service time at the batch it would join, plus
the recently observed gap between such predictions and reality — and stops when that
is past the deadline. Under load queues grow, predictions grow, and requests answer
from earlier exits instead of being refused. A deadline request that one ORT call is
predicted to answer in time (the deepest exit's full-path graph, or the fused cascade),
counting the requests already in flight, runs that call instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import cascade
from .batching import GraphWorker, HeldAnswers, LoneRun, Settle
from .errors import Overloaded
from .fused import cap_thresholds
from .latency import DecayingMean, ServiceTimeModel
from .memo import Memo
from .metrics import ServingMetrics
from .outputs import softmax
from .policy import CostTable, Plan, PolicyParams, plan_request
from .runtime import Graph, ModelRuntime
from .sessions import CPU

log = logging.getLogger("serving.service")


# One call is predicted in time only with this many mean deviations of one-call lateness to spare
# beyond the mean itself: about nine answers in ten in time for lateness spread as a Laplace law.
ONE_CALL_SPREADS = 2.0

# Lone requests' one-thread sessions are re-timed against the all-core ones, one main-exit run of
# one way at a time, every this many probe intervals of an idle server (ModelRuntime.time_lone_way).
LONE_RECHECK_PROBE_INTERVALS = 5
# In a long lull a graph is re-timed once it has not run for half the lull so far, up to this.
MAX_IDLE_PROBE_INTERVAL_S = 60.0
# How long clients just answered are expected back (CPU provider; batching.Settle): a client that
# keeps requests in flight sends its next one within a loopback round trip and a parse.
DEFAULT_SETTLE_MS = 2.0


def _nothing_more() -> bool:
    """``more_coming`` of a cascade's later stages: no request enters the model there."""
    return False


@dataclass
class Outcome:
    """The result of running one plan on one input."""

    exit: int
    logits: np.ndarray  # the answering exit's, one sample; /classify ranks them (serving.outputs.ranked)
    exits_evaluated: list[int]
    gflops: float
    seconds: float  # enqueue of the first graph → result of the last
    # Deadline requests only: whether the answer was ready in time, and whether the
    # deadline (not confidence, not the plan) stopped it before the exit an idle
    # server would have reached.
    deadline_met: bool | None = None
    degraded: bool = False

    @functools.cached_property
    def probs(self) -> np.ndarray:
        """The softmax of :attr:`logits` (float64), formed only where an answer needs them all
        (Open Inference Protocol answers): not in ``seconds``, and not for /classify's ranking."""
        return softmax(self.logits)

    def answered_at(self, now: float, deadline: float | None) -> None:
        """Ready in time at the model but answered late, by the answer's own work (ranking, signing,
        an OIP call's other samples): ``deadline_met`` must not contradict the latency reported."""
        if self.deadline_met and deadline is not None and now > deadline:
            self.deadline_met = False


@dataclass
class Ticket:
    """An admitted request. ``preparing`` until it submits its first graph input."""

    preparing: bool = True
    # Its arrival was counted in InferenceService.arrived until admission (the fast path's requests).
    arrival_counted: bool = False
    _service: InferenceService | None = field(default=None, repr=False)

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
        max_wait_ms: float = 10.0,
        batch_settle_ms: float | None = None,
        queue_size: int = 256,
        inference_workers: int = 1,
        estimate_half_life_s: float = 0.5,
        probe_interval_s: float = 1.0,
        deadline_margin_ms: float = 0.5,
        inline_max_ms: float = 10.0,
        answers: HeldAnswers | None = None,
    ) -> None:
        self.runtime = runtime
        # Where the HTTP server holds a batch's answers until all of its handlers have run
        # (serving/transport.py), told by every graph's batcher.
        self._answers = answers
        self.metrics = metrics
        self.costs = CostTable.from_manifest(runtime.manifest)
        self.queue_size = queue_size
        self.max_batch_size = max_batch_size
        self._max_wait_s = max_wait_ms / 1000.0
        # None: settle on the CPU provider, where the event loop's work shares the cores with ORT's
        # threads; not where ORT runs elsewhere (a GPU), which the wait would leave idle.
        if batch_settle_ms is None:
            batch_settle_ms = DEFAULT_SETTLE_MS if runtime.provider == CPU else 0.0
        self.settle = Settle(batch_settle_ms / 1000.0)
        self._workers_count = inference_workers
        self._executor = ThreadPoolExecutor(max_workers=inference_workers, thread_name_prefix="eed-ort")
        self._graphs = {g.name: g for g in runtime.graphs}
        self.service_models = {g.name: ServiceTimeModel(estimate_half_life_s) for g in runtime.graphs}
        # Observed minus predicted finish time of a stage (event-loop delay, hand-offs).
        self.prediction_gap = DecayingMean(estimate_half_life_s)
        # How far one-call answers land from their prediction (gap included), on average: one call
        # cannot stop early, so it is taken only with ONE_CALL_SPREADS of these to spare.
        self.one_call_spread = DecayingMean(estimate_half_life_s)
        self.deadline_floor_ms: float | None = None  # set by seed_latency
        self._probe_interval_s = probe_interval_s
        self._margin_s = deadline_margin_ms / 1000.0
        self._probe_task: asyncio.Task | None = None
        self._probe_inputs: dict[str, Any] = {}
        self._probing = False
        self._inline_max_ms = inline_max_ms
        self._inflight = 0
        self._last_active = time.monotonic()  # a request's last entry to or exit from run() (probes wait for a lull)
        # Requests the server's HTTP protocol has read in full whose handlers have not been
        # admitted yet (serving/fastpath.py counts the ones it answers): with any, a request is
        # not alone; so the fast path's requests decide at once (Ticket.arrival_counted), where
        # others yield a loop turn to let the requests read with them be admitted first.
        self.arrived = 0
        self._in_run = 0  # requests inside run(), admitted or not
        self._plans: Memo[PolicyParams, Plan] = Memo()  # plans without a deadline depend on the costs only
        self._preparing = 0
        self.exit_workers = [self._worker(g) for g in runtime.exits]
        self.stage_workers = [self._worker(g, starts_requests=i == 0) for i, g in enumerate(runtime.stages)]
        # Confidence cascades run in one ORT call when the model has a fused cascade graph
        # (serving/fused.py chose it by measurement at load); with a deadline, when predicted in time.
        self.fused_worker = self._worker(runtime.fused) if runtime.fused is not None else None
        # Every graph's worker, as one list: the lone-request check walks it on every request.
        self._all_workers: list[GraphWorker] = [
            *self.exit_workers,
            *self.stage_workers,
            *([self.fused_worker] if self.fused_worker else []),
        ]
        self._workers = {w.name: w for w in self._all_workers}

    @classmethod
    def from_settings(
        cls,
        runtime: ModelRuntime,
        metrics: ServingMetrics,
        settings,
        answers: HeldAnswers | None = None,
    ) -> InferenceService:
        return cls(
            runtime,
            metrics,
            answers=answers,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            batch_settle_ms=settings.batch_settle_ms,
            queue_size=settings.queue_size,
            inference_workers=settings.inference_workers,
            estimate_half_life_s=settings.estimate_half_life_s,
            probe_interval_s=settings.probe_interval_s,
            deadline_margin_ms=settings.deadline_margin_ms,
            inline_max_ms=settings.inline_max_ms,
        )

    def _worker(self, graph: Graph, starts_requests: bool = True) -> GraphWorker:
        """The batcher of ``graph``. ``starts_requests``: requests enter the model there (every graph
        but a cascade's later stages), so its batches wait for requests being read or decoded and for
        the clients just answered (Settle): they come there. A later stage's batch is the survivors of
        the stage before it, all queued in the loop turn its batch was handed out, and nothing else is
        on its way to it: it never waits (with a 10 ms max_wait and requests always being decoded,
        deadline requests under a 64-connection burst met 82-84 % of deadlines instead of 96 %)."""
        exit_label, kind = str(graph.exit), graph.kind
        batch_size = self.metrics.batch_size.labels(exit_label, kind)
        inference = self.metrics.inference_latency.labels(exit_label, kind)
        queue_wait = self.metrics.queue_wait.labels(exit_label, kind)
        model = self.service_models[graph.name]

        def on_batch(size: int, wait_s: float, run_s: float, rows: int) -> None:
            batch_size.observe(size)
            queue_wait.observe(wait_s)
            inference.observe(run_s)
            model.observe(rows, run_s)  # the time follows the rows ORT ran, padding included

        worker = GraphWorker(
            graph.name,
            graph.run,
            self._executor,
            self.max_batch_size,
            self._max_wait_s,
            more_coming=self._more_coming if starts_requests else _nothing_more,
            on_batch=on_batch,
            answers=self._answers,
            lone=LoneRun(graph.run_alone, self._alone),  # inline or not: decided in seed_latency
            pad_to=self.max_batch_size if graph.pads_batches() else None,
            settle=self.settle if starts_requests else None,
        )
        # Read when scraped, not set on every enqueue and batch (event-loop CPU per request).
        self.metrics.queue_depth.labels(exit_label, kind).set_function(worker.waiting)
        return worker

    def _more_coming(self) -> bool:
        """Requests read or being decoded, not yet in a queue."""
        return self._preparing > 0 or self.arrived > 0

    def _quiet(self, admitted: int) -> bool:
        """At most ``admitted`` requests admitted, none read and waiting for admission, nothing
        queued or in ORT."""
        return (
            self._inflight <= admitted
            and not self.arrived
            and not any(w.running or w.waiting() for w in self._all_workers)
        )

    def _alone(self) -> bool:
        """Whether the one admitted request is all there is: nothing else read, queued, running or
        probing, and no client just answered expected back (batching.Settle)."""
        return not self._probing and self._quiet(1) and not self.settle.wait_s()

    # -- lifecycle -----------------------------------------------------------------

    def seed_latency(self, timings: dict[str, list[tuple[int, float]]]) -> None:
        """Seed every graph's service-time model from start-up calibration."""
        for name, samples in timings.items():
            self.service_models[name].seed(samples)
        # The shortest deadline accepted (422 below): exit 1's calibrated idle service time,
        # fixed, so that whether a request is valid does not change with load history (and
        # the OpenAPI schema can state it). Longer deadlines that the live estimate says exit 1
        # cannot meet still get exit 1's answer, with deadline_met false.
        self.deadline_floor_ms = self.idle_service_ms()[1][0]
        # A lone request runs its graph on the event loop when that blocks the loop for a few
        # ms at most: the thread hand-off it saves (a wake-up of the inference thread and one of
        # the loop, each a cross-CPU wake-up on a VM) is worth little beside longer runs, and
        # other requests arriving meanwhile are not read until it ends. On all-core sessions
        # too: with idle servers frozen and ORT's threads no longer spinning after a run, the
        # event loop as ORT's calling thread measured 0.10–0.19 ms faster at one connection
        # (docs/request-path-profile.md, sixth session; the third measured the opposite beside
        # idle servers that were not frozen).
        # Judged by the graph's fastest recent lone run (serving.batching.LoneRun), seeded here with
        # the calibration's: its own cost, which a stall of the host only adds to — not the fitted
        # estimate (a mean): one slow run of ten took the full-width main exit's mean past 10 ms in
        # one server of a benchmark run (6.6 ms typical). Live lone runs keep judging it, so a stall
        # through every calibration run no longer decides for the process's whole life.
        for worker in self._all_workers:
            assert worker.lone is not None
            worker.lone.max_inline_s = self._inline_max_ms / 1e3
            alone = [seconds for batch, seconds in timings.get(worker.name, ()) if batch == 1]
            for seconds in alone or [self.service_models[worker.name].estimate(1)]:
                worker.lone.observe(seconds)
        self.publish_estimates()

    def lone_on_event_loop(self) -> list[str]:
        """The graphs whose lone requests run on the event loop itself now (the fastest of their
        recent lone runs at most ``inline_max_ms``: serving.batching.LoneRun); the others' run in
        the inference thread. It changes as lone runs are observed."""
        return [w.name for w in self._all_workers if w.lone is not None and w.lone.inline]

    async def start(self) -> None:
        """Start every graph's batching loop and the idle prober (call from the event loop)."""
        for worker in self._all_workers:
            worker.start()
        x = self.runtime.example_input(1, seed=3)
        stage_inputs = self.runtime.stage_inputs(x)
        for graph in self.runtime.graphs:
            self._probe_inputs[graph.name] = graph.feed(x, stage_inputs)
        if self._probe_interval_s > 0:
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop(), name="latency-probes")

    async def stop(self) -> None:
        """Stop the prober, the batching loops and the inference threads."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        for worker in self._all_workers:
            await worker.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    # -- admission -----------------------------------------------------------------

    @contextlib.contextmanager
    def admit(self, arrival_counted: bool = False) -> Iterator[Ticket]:
        """Admit one request or raise Overloaded (503 + Retry-After) when full. ``arrival_counted``:
        the request was counted in :attr:`arrived` from when it was read until now."""
        if self._inflight >= self.queue_size:
            raise Overloaded(
                f"server is at capacity ({self.queue_size} requests in flight); retry shortly",
                retry_after_s=1,
                queue_size=self.queue_size,
            )
        self._inflight += 1
        self._preparing += 1
        ticket = Ticket(arrival_counted=arrival_counted, _service=self)
        try:
            yield ticket
        finally:
            ticket.started()  # no-op unless it failed before reaching the model
            self._inflight -= 1

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered (the admitted-requests gauge)."""
        return self._inflight

    # -- estimates -------------------------------------------------------------------

    def queue_delay_s(self, target: GraphWorker | None = None) -> float:
        """Predicted wait before a new item for ``target`` starts running, from the queues now.

        What runs first: the rest of every batch in ORT, the next batch of every other
        graph (one ORT thread pool serves them all, first come first served) and the
        full batches already queued ahead in ``target``'s own queue.
        """
        now = time.perf_counter()
        backlog = 0.0
        for worker in self._all_workers:
            model = self.service_models[worker.name]
            for size, since in worker.running:
                backlog += max(0.0, model.estimate(size) - (now - since))
            queued = worker.waiting()
            if worker is target:
                backlog += (queued // self.max_batch_size) * model.estimate(self.max_batch_size)
            elif queued:
                backlog += model.estimate(worker.rows(min(queued, self.max_batch_size)))
        return backlog / self._workers_count

    def predicted_finish_s(self, worker: GraphWorker, with_gap: bool = True) -> float:
        """Seconds from now until an item submitted to ``worker`` now would have its result; without
        the prediction gap (``with_gap`` False), what the gap itself learns against."""
        own_batch = worker.waiting() % self.max_batch_size + 1
        service = self.service_models[worker.name].estimate(worker.rows(own_batch))
        return self.queue_delay_s(worker) + service + (self.gap_s() if with_gap else 0.0)

    def gap_s(self) -> float:
        """The recently observed lateness of predictions that leave it out (never negative)."""
        return max(0.0, self.prediction_gap.value())

    def whole_path_in_time(self, plan: Plan, deadline: float) -> tuple[str, float] | None:
        """For a deadline, whether one ORT call can answer in time: ``("single", predicted
        seconds)`` — a pure deadline (no confidence thresholds), run as the full-path graph of the
        plan's deepest exit — or ``("fused", predicted seconds)`` — a confidence cascade, run as the
        fused cascade graph, predicted as the stage chain to the plan's deepest exit (the most it
        can run). None: run stage by stage.

        Stage by stage, a deadline pays one run, hand-off and score per stage, and for a pure
        deadline the heads of every earlier exit (full-width export, deadline requests at one
        connection: p50 9.2 ms stage by stage, 6.0 ms as one graph; ``benchmarks/anytime_load.py``,
        ``anytime_load_stage_by_stage.json`` vs ``anytime_load.json``).
        The stages are for when the load may not let the deepest exit finish: they can stop
        early. When one call is predicted to finish in time (with the deadline margin), its
        answer is the one the stages would reach, sooner. The prediction is the queues now plus
        every other request inside ``run``, run in batches through the costlier of the two paths
        — a bound: requests arriving together would otherwise each decide on the same empty queues
        and all pile onto one graph, and a long one-call batch holds the inference threads that
        everyone else's stages need. As one batch-1 run each, 64 connections of the shipped model
        with a 100 ms deadline went stage by stage nearly always (1,000 req/s, p50 64 ms, against
        2,000 and 30 ms as one graph, whose answers were always in time); counting only requests
        no queue held, the full-width export at 64 connections took one call 9 % of the time and
        met 84 % of its deadlines (``anytime_load.py``), against 98 % counted so.
        """
        if plan.mode != "cascade" or plan.thresholds is None:
            return None
        pure = all(t >= cascade.NEVER for t in plan.thresholds[: plan.exit - 1])
        if not pure and self.fused_worker is None:
            return None
        exit_worker = self.exit_workers[plan.exit - 1]
        others = 0.0
        if self._in_run > 1:
            others = max(
                self._batched_s([exit_worker], self._in_run - 1),
                self._batched_s(self.stage_workers[: plan.stages_to], self._in_run - 1),
            )
        if pure:
            # Returned without the gap: the gap learns the lateness of predictions that leave it out
            # (learning against predictions that include it, it settled at half the true lateness).
            how, predicted = "single", self.predicted_finish_s(exit_worker, with_gap=False)
            # The gap is the mean lateness: a call predicted in time by it alone is late about half
            # the time when the deadline is tight (64 connections at 30 ms: 40 % of one-call answers).
            expected = predicted + self.gap_s() + ONE_CALL_SPREADS * self.one_call_spread.value()
        else:
            how, predicted = "fused", self.cascade_finish_s(plan.exit)
            expected = predicted
        # Returned without the others' allowance: it is a bound, and the prediction gap learns from
        # the estimate alone (a bound would teach it that predictions run late less than they do).
        in_time = time.perf_counter() + expected + others + self._margin_s <= deadline
        return (how, predicted) if in_time else None

    def _batched_s(self, workers: list[GraphWorker], requests: int) -> float:
        """Seconds for ``requests`` more items through ``workers`` in turn, in full batches and one
        partial batch, shared among the inference workers as :meth:`queue_delay_s` shares them."""
        full, rest = divmod(requests, self.max_batch_size)
        total = 0.0
        for worker in workers:
            model = self.service_models[worker.name]
            total += full * model.estimate(worker.rows(self.max_batch_size))
            if rest:
                total += model.estimate(worker.rows(rest))
        return total / self._workers_count

    def idle_service_ms(self) -> tuple[list[float], list[float]]:
        """Per exit, at batch 1 without queueing: (full path, cascade of stages 1..i), in ms."""
        single = [self.service_models[g.name].estimate(1) * 1e3 for g in self.runtime.exits]
        stages = [self.service_models[g.name].estimate(1) * 1e3 for g in self.runtime.stages]
        return single, [float(x) for x in np.cumsum(stages)]

    def cascade_finish_s(self, exit_number: int) -> float:
        """Seconds until a cascade of stages 1..``exit_number`` submitted now would answer: stage 1
        behind the queues now, each further stage at its batch-1 time plus the prediction gap."""
        gap = self.gap_s()
        later = self.stage_workers[1:exit_number]
        return self.predicted_finish_s(self.stage_workers[0]) + sum(
            self.service_models[w.name].estimate(1) + gap for w in later
        )

    def latency_estimates_ms(self) -> tuple[list[float], list[float]]:
        """Per exit, for a request arriving now: (full path, cascade to this exit), in ms."""
        single = [self.predicted_finish_s(w) * 1e3 for w in self.exit_workers]
        return single, [self.cascade_finish_s(i) * 1e3 for i in range(1, len(self.stage_workers) + 1)]

    def publish_estimates(self) -> None:
        """Copy the current estimates into the Prometheus gauges."""
        single, cascade_ms = self.latency_estimates_ms()
        for i, (s, c) in enumerate(zip(single, cascade_ms), start=1):
            self.metrics.latency_estimate.labels(str(i), "single").set(s / 1e3)
            self.metrics.latency_estimate.labels(str(i), "cascade").set(c / 1e3)

    async def _probe_loop(self) -> None:
        """Keep every graph's service estimate current while the server is idle.

        A graph that no request has used for ``probe_interval_s`` (say, deep exits
        that deadlines skipped during a burst) gets one batch-1 run on a fixed input,
        only in a lull — nothing admitted, queued or running, and no request entering or
        leaving :meth:`run` for a whole tick — one graph per tick. Quiet at the tick's instant is not
        enough: under a steady stream of requests one at a time the server is quiet between
        an answer and the next request's arrival, and a tick's timer, due during an inline
        run, fires right after the answer, in that gap: probes then ran several times a
        second and the next request waited for them (one connection, full-width export:
        p99 20.0 vs 10.9 ms and 131 vs 139 req/s, docs/request-path-profile.md, twelfth
        session). Estimates of graphs nobody uses return to their idle calibration without
        probes (ServiceTimeModel's prior); the probes keep them current. The longer a lull
        lasts the less a probe has to tell: a graph is stale after ``probe_interval_s`` or half
        the lull so far, whichever is longer, up to :data:`MAX_IDLE_PROBE_INTERVAL_S` (an idle
        server probed at every tick for good: ~4 % of a core with the full-width export, taken
        from whatever else shares the host). Every
        :data:`LONE_RECHECK_PROBE_INTERVALS` probe intervals, when start-up gave lone
        requests one-thread sessions, a tick times the main exit one way instead, the two
        ways in turn (ModelRuntime.time_lone_way, LoneThreadsJudge) — quiet at the tick's
        instant is enough for that one: a wrong choice would otherwise last as long as a
        steady stream of requests does, and it delays one request every few seconds at most.
        """
        tick = max(0.05, self._probe_interval_s / 4)
        lone_checked = time.monotonic()
        one_thread_next = False  # the way lone requests are not on at start-up: all cores
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if not self._quiet(0):
                continue
            judge, main = self.runtime.lone_judge, self.exit_workers[-1]
            # The lone-session re-check needs no lull: one main-exit run every few intervals, and a
            # start-up choice made on contended timings must not last as long as traffic does.
            if judge is not None and now - lone_checked >= LONE_RECHECK_PROBE_INTERVALS * self._probe_interval_s:
                lone_checked = now
                way, one_thread_next = one_thread_next, not one_thread_next
                seconds = await self._probe(main, self.runtime.time_lone_way, way)
                if seconds is not None:
                    judge.observe(way, seconds)
                    self.runtime.use_one_thread_lone_sessions(judge.prefers_one_thread(self.runtime.lone_on_one_thread))
                continue
            lull = now - self._last_active
            if lull < tick:
                continue
            interval = max(self._probe_interval_s, min(lull / 2, MAX_IDLE_PROBE_INTERVAL_S))
            stale = [
                (m.last_observed or 0.0, name)
                for name, m in self.service_models.items()
                if m.last_observed is None or now - m.last_observed >= interval
            ]
            if not stale:
                continue
            _, name = min(stale)
            seconds = await self._probe(self._workers[name], self._graphs[name].run_alone, self._probe_inputs[name])
            if seconds is not None:
                self.service_models[name].observe(1, seconds)

    async def _probe(self, worker: GraphWorker, run: Callable[[Any], Any], arg: Any) -> float | None:
        """``run(arg)`` in the inference thread as a batch of 1 of ``worker``'s graph: seen by the
        lone check (not alone meanwhile) and by queueing estimates (it is in ORT). Its seconds,
        hand-offs included, or None when it failed (logged: a probe never takes the server down)."""
        entry = (1, time.perf_counter())
        worker.running.append(entry)
        self._probing = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, run, arg)
        except Exception:
            log.exception("idle-time probe of %s failed", worker.name)
            return None
        finally:
            self._probing = False
            worker.running.remove(entry)
        return time.perf_counter() - entry[1]

    # -- execution -------------------------------------------------------------------

    def plan(self, params: PolicyParams) -> Plan:
        """Plan a request against this model's costs and idle service times."""
        if params.budget_ms is not None:  # depends on the service times now: planned every time
            idle_single_ms, idle_cascade_ms = self.idle_service_ms()
            # One call is taken only with the margin to spare (whole_path_in_time): an exit it cannot
            # reach on an idle server is not the plan's, or every such answer would read as degraded.
            idle_single_ms = [ms + self._margin_s * 1e3 for ms in idle_single_ms]
            if self.deadline_floor_ms is not None:
                idle_single_ms[0] = idle_cascade_ms[0] = self.deadline_floor_ms
            return plan_request(params, self.costs, idle_cascade_ms, idle_single_ms)
        plan = self._plans.get(params)
        if plan is None:
            plan = plan_request(params, self.costs)  # raises for a plan this model cannot run
            self._plans.put(params, plan)
        return plan

    async def run(
        self, x: np.ndarray, plan: Plan, ticket: Ticket | None = None, deadline: float | None = None
    ) -> Outcome:
        """Run ``plan`` on one preprocessed input (C, H, W) and return the answer.

        ``deadline`` (a ``time.perf_counter()`` instant) applies to cascades: stage 1
        always runs, each further stage only if it is predicted to finish in time — unless
        one ORT call is predicted to answer in time (:meth:`whole_path_in_time`).
        """
        if ticket is not None:
            ticket.started()
        self._in_run += 1
        self._last_active = time.monotonic()
        self.settle.arrived()
        try:
            return await self._run(x, plan, deadline, ticket is not None and ticket.arrival_counted)
        finally:
            self._in_run -= 1
            self._last_active = time.monotonic()
            self.settle.answered(self._last_active)

    async def _run(self, x: np.ndarray, plan: Plan, deadline: float | None, counted: bool) -> Outcome:
        started = time.perf_counter()
        evaluated: list[int] = []
        degraded = False
        mode = plan.mode
        one_call = None if deadline is None else self.whole_path_in_time(plan, deadline)
        how, predicted = one_call or (None, 0.0)
        if plan.mode == "single" or how == "single":
            mode = "single"
            (logits,) = await self.exit_workers[plan.exit - 1].submit(x, arrivals_counted=counted)
            if how == "single":  # an estimate (the fused path's is a bound, which would bias the gap)
                lateness = (time.perf_counter() - started) - predicted
                self.one_call_spread.observe(abs(lateness - self.gap_s()))
                self.prediction_gap.observe(lateness)
            evaluated.append(plan.exit)
        elif self.fused_worker is not None and (deadline is None or how == "fused"):
            # The same rule inside the graph (float64 score, per-sample thresholds capped at plan.exit).
            assert plan.thresholds is not None  # a cascade plan always has them
            logits, answered = await self.fused_worker.submit(
                (x, cap_thresholds(plan.thresholds, plan.exit)), arrivals_counted=counted
            )
            evaluated.extend(range(1, int(answered) + 1))
        else:
            thresholds = np.asarray(plan.thresholds, dtype=np.float64)
            features = x
            last = plan.stages_to
            # A pure deadline whose stages cannot reach the exit one call would (their costs or
            # idle time): the load that sent it to the stages made the answer shallower.
            degraded = last < plan.exit
            for number in range(1, last + 1):
                worker = self.stage_workers[number - 1]
                if deadline is not None:
                    predicted = self.predicted_finish_s(worker, with_gap=False)
                    now = time.perf_counter()
                    if number > 1 and now + predicted + self.gap_s() + self._margin_s > deadline:
                        degraded = True
                        break
                    outputs = await worker.submit(features, arrivals_counted=counted)
                    self.prediction_gap.observe((time.perf_counter() - now) - predicted)
                else:
                    outputs = await worker.submit(features, arrivals_counted=counted)
                logits = outputs[0]
                evaluated.append(number)
                # The shared rule on the shared score, so answers match the offline calibration.
                top = float(cascade.top_probability(logits))
                if number == last or cascade.stops_at(top, thresholds, number):
                    break
                features = outputs[1]
        finished = time.perf_counter()
        return Outcome(
            exit=evaluated[-1],
            logits=logits,
            exits_evaluated=evaluated,
            gflops=self.costs.spent(mode, evaluated),
            seconds=finished - started,
            deadline_met=None if deadline is None else finished <= deadline,
            degraded=degraded,
        )
