"""Prometheus metrics of the server, in a dedicated registry (prefix ``eed_``).

Series (DESIGN §5):

========================================  =========  ====================================
name                                      type       labels
========================================  =========  ====================================
eed_requests_total                        counter    exit, policy, status (HTTP code)
eed_request_latency_seconds               histogram  exit — whole /classify handling
eed_inference_latency_seconds             histogram  exit, graph (exit|stage|cascade) — one ORT batch run
eed_queue_wait_seconds                    histogram  exit, graph — oldest item's wait per batch
eed_gflops_spent_total                    counter    exit — GFLOPs actually computed
eed_request_gflops                        histogram  exit, policy — GFLOPs per request
eed_batch_size                            histogram  exit, graph
eed_queue_depth                           gauge      exit, graph
eed_inflight_requests                     gauge      —
eed_deadline_total                        counter    exit, outcome (met|missed) — requests with a deadline
eed_degraded_total                        counter    exit — deadline answers stopped before the exit an
                                                     idle server would have reached (load, not confidence)
eed_exit_gflops                           gauge      exit — full-path cost from the manifest
eed_exit_stage_gflops                     gauge      exit — stage cost from the manifest
eed_exit_params                           gauge      exit
eed_exit_accuracy                         gauge      exit — evaluated accuracy from the manifest
eed_exit_latency_estimate_seconds         gauge      exit, route (single|cascade)
eed_feedback_total                        counter    exit, correct (true|false) — answers labelled via
                                                     POST /feedback; live accuracy is a recording rule
                                                     (docker/prometheus/rules/feedback.yml) so replicas sum
eed_model_info                            gauge      name, arch, dataset, provider (value 1)
eed_model_ready                           gauge      — 1 once loaded and warm (0 again while draining)
eed_build_info                            gauge      version, revision, model, model_checksum (value 1)
eed_admitted_requests                     gauge      — requests holding an admission slot now
eed_admission_limit                       gauge      — admission slots (EED_QUEUE_SIZE); 503 beyond
process_*                                 various    the process collector: CPU, memory, fds, start time
========================================  =========  ====================================

GFLOPs are kept as GFLOPs (not FLOPs) because that is the unit of the manifest and
the DESIGN's contract; the names say so.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from . import buildinfo
from .policy import policy_labels

# The ``*_created`` timestamp series double the exposition size and no dashboard here
# uses them. Process-wide switch; the server process owns its metrics.
prometheus_client.disable_created_metrics()

# Sub-millisecond to multi-second: tiny models answer in ~100 µs, big ones on CPU in 100s of ms.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # up to max_batch_size's bound
GFLOPS_BUCKETS = (0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0)


class ServingMetrics:
    """All metric objects of one app instance, registered in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Memory, CPU, open fds, start time (restarts) of this process; python_info for the runtime.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "eed_build_info",
            "Code and model this replica serves (value is always 1); model_checksum is a "
            "sha256 over the manifest's file checksums",
            ["version", "revision", "model", "model_checksum"],
            registry=r,
        )
        self.admitted = Gauge(
            "eed_admitted_requests", "Requests holding an admission slot (read, queued or running)", registry=r
        )
        self.admission_limit = Gauge(
            "eed_admission_limit", "Admission slots; requests beyond them get 503 (EED_QUEUE_SIZE)", registry=r
        )
        self.requests = Counter(
            "eed_requests",
            "Classification requests by answering exit, policy and HTTP status (an Open Inference "
            "Protocol call counts once per image it carries, answered or refused)",
            ["exit", "policy", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "eed_request_latency_seconds",
            "Time to handle POST /classify, by answering exit",
            ["exit"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_latency = Histogram(
            "eed_inference_latency_seconds",
            "ONNX Runtime time of one batch, by exit and graph kind",
            ["exit", "graph"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "eed_queue_wait_seconds",
            "Wait of the oldest request in a batch before it ran",
            ["exit", "graph"],
            # A lone request run at once waits exactly 0: with (0, 100 µs] as the first bucket,
            # histogram_quantile made every quantile of an idle server's waits 95 µs.
            buckets=(0.0, *LATENCY_BUCKETS),
            registry=r,
        )
        self.gflops_spent = Counter(
            "eed_gflops_spent", "GFLOPs computed for answered requests, by answering exit", ["exit"], registry=r
        )
        self.request_gflops = self._request_gflops(GFLOPS_BUCKETS)
        self.batch_size = Histogram(
            "eed_batch_size",
            "Requests per batch sent to ONNX Runtime",
            ["exit", "graph"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "eed_queue_depth", "Requests waiting in a graph's batching queue", ["exit", "graph"], registry=r
        )
        self.inflight = Gauge("eed_inflight_requests", "Requests admitted and not yet answered", registry=r)
        self.deadlines = Counter(
            "eed_deadline",
            "Answered requests with a deadline (budget_ms or the server default), by exit and "
            "whether the answer was ready in time",
            ["exit", "outcome"],
            registry=r,
        )
        self.degraded = Counter(
            "eed_degraded",
            "Deadline answers from an earlier exit than an idle server would have used, "
            "because the next stage could not finish in time",
            ["exit"],
            registry=r,
        )
        self.exit_gflops = Gauge("eed_exit_gflops", "Full-path cost of each exit (manifest)", ["exit"], registry=r)
        self.exit_stage_gflops = Gauge(
            "eed_exit_stage_gflops", "Stage-graph cost of each exit (manifest)", ["exit"], registry=r
        )
        self.exit_params = Gauge(
            "eed_exit_params", "Parameters on each exit's full path (manifest)", ["exit"], registry=r
        )
        self.exit_accuracy = Gauge(
            "eed_exit_accuracy", "Top-1 accuracy of each exit on the evaluation split (manifest)", ["exit"], registry=r
        )
        self.latency_estimate = Gauge(
            "eed_exit_latency_estimate_seconds",
            "Predicted time to an answer from this exit for a request arriving now (queueing + service)",
            ["exit", "route"],
            registry=r,
        )
        self.feedback = Counter(
            "eed_feedback",
            "Answers for which a client posted the true label, by answering exit and outcome",
            ["exit", "correct"],
            registry=r,
        )
        self.model_info = Gauge(
            "eed_model_info",
            "The model being served (value is always 1)",
            ["name", "arch", "dataset", "provider"],
            registry=r,
        )
        self.ready = Gauge("eed_model_ready", "1 once the model is loaded and warmed up", registry=r)
        # The labelled series an answer touches, by label values: ``labels()`` validates and locks
        # on every call, and an answer would call it four times (docs/request-path-profile.md).
        self._answer_series: dict[tuple[str, str], tuple] = {}
        self._request_counts: dict[tuple[str, str, str], Counter] = {}

    def _request_gflops(self, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(
            "eed_request_gflops",
            "GFLOPs spent per answered request",
            ["exit", "policy"],
            buckets=buckets,
            registry=self.registry,
        )

    def describe_model(self, manifest, provider: str) -> None:
        """Set the static per-exit gauges from the manifest, and pre-create per-exit series.

        Pre-creating the zero-valued request/feedback series means dashboards and
        Prometheus queries see every exit from the first scrape, not only exits
        that have answered already.
        """
        self.model_info.labels(manifest.name, manifest.arch, manifest.dataset, provider).set(1)
        # Every cost an answer can have (an exit's full path, a cascade stopping there) is a bucket
        # bound of its own: the shipped model's exits 1-3 (0.021, 0.032, 0.043 GFLOPs) all fell in
        # the generic (0.01, 0.05] bucket, and quantiles of per-request GFLOPs were interpolation.
        costs = {float(c) for e in manifest.exits for c in (e.gflops, e.cascade_gflops) if c is not None}
        buckets = tuple(sorted(costs | set(GFLOPS_BUCKETS)))
        if buckets != GFLOPS_BUCKETS:
            self.registry.unregister(self.request_gflops)
            self.request_gflops = self._request_gflops(buckets)
            self._answer_series.clear()  # they held the histogram just replaced
        for spec in manifest.exits:
            e = str(spec.exit)
            self.exit_gflops.labels(e).set(spec.gflops)
            self.exit_stage_gflops.labels(e).set(spec.stage_gflops)
            self.exit_params.labels(e).set(spec.params)
            if spec.accuracy is not None:
                self.exit_accuracy.labels(e).set(spec.accuracy)
            self.gflops_spent.labels(e)
            self.degraded.labels(e)
            for outcome in ("met", "missed"):
                self.deadlines.labels(e, outcome)
            for outcome in ("true", "false"):
                self.feedback.labels(e, outcome)
            self.request_latency.labels(e)
        # The server's own failures, per policy, from zero: a series that first appears at 1 has no
        # earlier sample for rate() or increase(), so a lone first 5xx never reached the error ratio
        # or its alert. (Such failures answer before an exit is chosen: exit="none".)
        policies = manifest.thresholds.policies if manifest.thresholds else {}
        for policy in policy_labels(policies):
            for status in ("500", "503"):
                self.count_request("none", policy, status, images=0)
        # eed_queue_depth{exit, graph}: every graph's series exists already, read from its queue at
        # each scrape (InferenceService._worker).

    def record_feedback(self, exit_number: int, correct: bool) -> None:
        """Count one labelled answer."""
        self.feedback.labels(str(exit_number), "true" if correct else "false").inc()

    def record_answer(self, outcome, policy: str, elapsed_s: float) -> None:
        """Count one answered request (any route): latency, GFLOPs, deadline outcome."""
        key = (str(outcome.exit), policy)
        series = self._answer_series.get(key)
        if series is None:
            e = key[0]
            series = self._answer_series[key] = (
                self.request_latency.labels(e),
                self.gflops_spent.labels(e),
                self.request_gflops.labels(e, policy),
                self.deadlines.labels(e, "met"),
                self.deadlines.labels(e, "missed"),
                self.degraded.labels(e),
            )
        latency, spent, gflops, met, missed, degraded = series
        latency.observe(elapsed_s)
        spent.inc(outcome.gflops)
        gflops.observe(outcome.gflops)
        if outcome.deadline_met is not None:
            (met if outcome.deadline_met else missed).inc()
        if outcome.degraded:
            degraded.inc()

    def count_request(self, exit_label: str, policy: str, status: str, images: int = 1) -> None:
        """``eed_requests_total{exit, policy, status}`` + ``images``: every /classify request, every
        image of an OIP infer call."""
        key = (exit_label, policy, status)
        counter = self._request_counts.get(key)
        if counter is None:
            counter = self._request_counts[key] = self.requests.labels(*key)
        counter.inc(images)

    def describe_build(self, manifest, admitted: Callable[[], float], limit: int) -> None:
        """Publish build/model identity, and admission (``admitted`` is read at every scrape, for both
        ``eed_admitted_requests`` and ``eed_inflight_requests``: one number under two names)."""
        self.build_info.labels(
            buildinfo.package_version(),
            buildinfo.git_revision(),
            manifest.name,
            buildinfo.model_checksum(manifest.files),
        ).set(1)
        self.admitted.set_function(admitted)
        self.inflight.set_function(admitted)
        self.admission_limit.set(limit)

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)
