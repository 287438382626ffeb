"""Server settings: one pydantic-settings model, read from ``EED_*`` env vars and CLI flags.

Every field is an environment variable (``EED_`` + the upper-case field name, e.g.
``EED_MAX_BATCH_SIZE=16``) and a flag of ``python -m serving`` (kebab case, e.g.
``--max-batch-size 16``). Precedence: CLI flag > environment > default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .manifest import MODEL_NAME_PATTERN
from .policy import PolicyParams, parse_policy_spec
from .sessions import DEFAULT_SPIN_US


class ServerSettings(BaseSettings):
    """Settings of the EED server. Every option is also an environment variable EED_<OPTION>
    (e.g. EED_MAX_BATCH_SIZE=16); a flag wins over the environment."""

    # allow_inf_nan=False: "inf" or "nan" for a time or a size is refused, not read as "never"/"any".
    model_config = SettingsConfigDict(env_prefix="EED_", extra="ignore", validate_default=True, allow_inf_nan=False)

    model_dir: Path = Field(description="exported model folder (manifest.json + ONNX graphs)")
    model_name: str | None = Field(
        None,
        pattern=MODEL_NAME_PATTERN,
        description="a second name the Open Inference Protocol routes (/v2/models/{name}/...) answer to, besides "
        "the manifest's: KServe clients address the InferenceService's name, which the serving runtime passes "
        "as {{.Name}}. Unset: the manifest's name only",
    )
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 for all)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")

    max_batch_size: int = Field(32, ge=1, le=4096, description="largest batch sent to one graph")
    max_wait_ms: float = Field(
        10.0,
        ge=0,
        le=1000,
        description="how long a batch may wait for more requests while others are still being "
        "read or decoded, or clients just answered are expected back (batch_settle_ms); a lone request "
        "never waits",
    )
    batch_settle_ms: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="how long clients just answered are expected back: meanwhile a batch waits for them (up "
        "to max_batch_size or max_wait_ms) and no request is taken to be alone, so on a CPU the event loop's "
        "work for them is not done beside a batch's run. Unset: 2 on the CPU provider, 0 on a GPU; 0 = never",
    )
    queue_size: int = Field(
        256, ge=1, description="requests admitted at once (queued or running); more get 503 + Retry-After"
    )
    inference_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="batches that may run at once across all graphs; ORT already uses every core "
        "per batch, so more than 1 mostly adds contention on CPU",
    )
    inline_max_ms: float = Field(
        10.0,
        ge=0,
        description="a request that finds the server idle runs on the event loop itself (no thread hand-off) "
        "when its graph takes at most this long at batch 1 (the fused cascade graph: with every stage run); "
        "0 = never",
    )

    cascade_graph: Literal["auto", "fused", "stages"] = Field(
        "auto",
        description="how confidence cascades run: fused = one ONNX Runtime call per batch "
        "(the stage graphs fused into one graph with per-sample early stopping; needs the onnx package), "
        "stages = stage by stage, auto = fused when it measures faster at load; with a deadline, the fused "
        "graph only when the whole stage chain is predicted in time",
    )
    # Bounded: every graph has a session of its own, with threads of its own (100,000 started 32,000
    # threads and never became ready).
    intra_op_threads: int = Field(0, ge=0, le=512, description="ORT intra-op threads per session (0 = ORT default)")
    inter_op_threads: int = Field(0, ge=0, le=512, description="ORT inter-op threads per session (0 = ORT default)")
    ort_allow_spinning: bool = Field(
        False,
        description="let ORT worker threads busy-wait for work as long as ORT's own default has them (tens of "
        "ms of CPU after every run); off by default: such threads take the CPU that HTTP and the next graph's "
        "run need (every graph has threads of its own) and burn a container's CPU quota at low load. Overrides "
        "ort_spin_us and ort_keep_spinning_after_run",
    )
    ort_spin_us: int = Field(
        DEFAULT_SPIN_US,
        ge=0,
        description="microseconds an idle ORT worker thread busy-waits for more work before it sleeps "
        "(0 = never: every operator then wakes a sleeping thread, ~0.3 ms more per batch-1 run of the "
        "full-width benchmark model). Within a run only, unless ort_keep_spinning_after_run "
        "(benchmarks/ort_spinning.py)",
    )
    ort_keep_spinning_after_run: bool = Field(
        False,
        description="let ORT's threads keep spinning after a run, up to ort_spin_us. Every graph has "
        "threads of its own, so a graph run within that time (a cascade's next stage, a request for another "
        "exit) shares the cores with the last graph's spinning threads: off by default. On when every "
        "request uses one graph and the cores are the server's own",
    )
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry spans and metrics (with providers configured the "
        "usual OTel way); off: its per-request check costs event-loop CPU and Prometheus has the metrics",
    )
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="execution provider: auto = CUDA when onnxruntime-gpu and a GPU work, else CPU; "
        "cuda = CUDA required",
    )
    allow_provider_fallback: bool = Field(
        False, description="with providers=cuda, accept running on CPU when CUDA cannot be used"
    )
    cuda_conv_algo_search: Literal["heuristic", "exhaustive", "default"] = Field(
        "exhaustive",
        description="cuDNN convolution algorithm choice on the CUDA provider: exhaustive (ONNX Runtime's "
        "default) benchmarks every algorithm once per input shape, i.e. once per session at warm-up, since "
        "batches are padded to max_batch_size on the GPU; heuristic = cuDNN's heuristics (faster start, "
        "slower runs: on an H200 raw batch 32 ran 17 % slower); default = cuDNN's default algorithm",
    )

    default_policy: str = Field(
        "exit:last",
        description="policy when a request gives none: comma-separated key:value pairs with keys "
        "exit (N or last), budget_gflops, budget_ms, confidence, policy (a calibrated policy's name, "
        "see GET /v1/model); e.g. 'confidence:0.9' or 'policy:budget_0.5x_main'",
    )
    default_top_k: int = Field(5, ge=1, description="classes returned when a request gives no top_k")

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="largest request body (413 above)")
    max_pixels: int = Field(
        4096 * 4096, ge=1, description="largest decoded image, width x height (413 above; decompression bombs)"
    )

    warmup_runs: int = Field(3, ge=1, description="warm-up runs per graph before /readyz turns 200")
    calibration_runs: int = Field(
        10, ge=1, description="timed runs per graph at batch 1 and at max_batch_size that seed service-time estimates"
    )
    estimate_half_life_s: float = Field(
        0.5,
        gt=0,
        le=600,
        description="half-life of the live measurements behind service-time estimates: after a burst they "
        "return to the idle calibration within a few half-lives",
    )
    probe_interval_s: float = Field(
        1.0,
        ge=0,
        description="in a lull (no request for a quarter of this), re-time any graph not run for this long, or "
        "for half the lull so far up to a minute (batch 1, one graph per quarter), so estimates of exits that "
        "deadlines skipped stay current; 0 = never probe",
    )
    deadline_margin_ms: float = Field(0.5, ge=0, description="slack kept before a deadline for building the response")
    default_budget_ms: float | None = Field(
        None,
        gt=0,
        description="deadline (ms from arrival) for requests that give neither budget_ms nor exit: under load "
        "they answer from earlier exits instead of queueing past it; unset = no server-wide deadline",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="time allowed to receive a whole request body (408 past it); bodies are read before "
        "a request takes an admission slot, so slow uploads cannot exhaust capacity",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="time allowed for a request's line and headers to arrive, from its first byte (408 and "
        "the connection closed past it), so that connections cannot be held open by a trickle of header "
        "bytes; a connection with no request in progress, a new one included, closes after uvicorn's "
        "keep-alive timeout (5 s)",
    )
    feedback_capacity: int = Field(
        100_000, ge=1, description="labelled answer ids this replica remembers, to refuse a second label (409)"
    )
    feedback_secret: SecretStr | None = Field(
        None,
        description="key (at least 16 bytes) that signs answer ids for POST /feedback; give every replica the "
        "same one so feedback works on any of them. Unset: a random per-process key (and a warning)",
    )
    feedback_max_age_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="how long after an answer its id is accepted by POST /feedback (410 after)"
    )
    drain_seconds: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="after SIGTERM, keep serving this long with /readyz answering 503 (so load balancers "
        "stop sending) before closing the listener; in-flight requests then finish (serving/drain.py)",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: plain log lines; json: one JSON object per line, including one line per request "
        "(id, route, policy, exit, status, latency)",
    )

    @field_validator("default_policy")
    @classmethod
    def _check_policy(cls, value: str) -> str:
        parse_policy_spec(value)  # raises ValueError with the accepted format
        return value

    @field_validator("feedback_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 16:
            raise ValueError("feedback_secret must be at least 16 bytes; e.g. the output of `openssl rand -hex 32`")
        return value

    @model_validator(mode="after")
    def _check_default_deadline(self) -> ServerSettings:
        if self.default_budget_ms is not None and isinstance(self.default_policy_params.exit, int):
            raise ValueError(
                f"default_budget_ms cannot be combined with default_policy {self.default_policy!r}: a fixed exit "
                "cannot move to an earlier one when the deadline is near; use exit:last (or budget_gflops to cap "
                "the depth) with a server-wide deadline"
            )
        if self.default_budget_ms is not None and self.default_budget_ms <= self.deadline_margin_ms:
            # Every plain request would start past its deadline less the margin: exit 1, reported as missed.
            raise ValueError(
                f"default_budget_ms ({self.default_budget_ms:g}) must exceed deadline_margin_ms "
                f"({self.deadline_margin_ms:g}), the slack kept before every deadline; raise EED_DEFAULT_BUDGET_MS "
                "or lower EED_DEADLINE_MARGIN_MS"
            )
        return self

    @model_validator(mode="after")
    def _check_batch_size(self) -> ServerSettings:
        # A batch holds admitted requests (an OIP image counts as one), so it never exceeds queue_size.
        # Given both, a larger batch is a contradiction (the OIP config would advertise a preferred
        # batch above its max_batch_size, and GPU batches would be padded to rows never filled);
        # with queue_size alone, the default batch size follows it down.
        if self.max_batch_size > self.queue_size:
            if "max_batch_size" in self.model_fields_set:
                raise ValueError(
                    f"max_batch_size ({self.max_batch_size}) cannot exceed queue_size ({self.queue_size}), the "
                    "requests admitted at once; lower EED_MAX_BATCH_SIZE or raise EED_QUEUE_SIZE"
                )
            self.max_batch_size = self.queue_size
        return self

    @property
    def default_policy_params(self) -> PolicyParams:
        """The parsed default policy."""
        return parse_policy_spec(self.default_policy)
