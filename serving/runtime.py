"""ONNX Runtime sessions for a model folder: loading, provider choice, warm-up, calibration.

A model folder holds, for every exit i, ``exit{i}.onnx`` (image → logits of exit i)
and ``stage{i}.onnx`` (stage 1: image → logits and trunk features; stage i > 1:
features of stage i-1 → logits and, for i < k, features of stage i). Input and
output names come from the manifest's ``io`` section. This module never imports
torch.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from .errors import ModelLoadError
from .manifest import Manifest, ManifestError, load_manifest
from .sessions import CPU, CUDA, DEFAULT_SPIN_US, open_session, run_chain

log = logging.getLogger("serving.runtime")


@dataclass(frozen=True)
class SessionOptions:
    """The ORT knobs the server exposes (see ServerSettings); the defaults are the server's."""

    providers: Literal["auto", "cpu", "cuda"] = "auto"
    allow_provider_fallback: bool = False
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    allow_spinning: bool = False
    spin_us: int = DEFAULT_SPIN_US
    stop_spinning_after_run: bool = True
    cuda_conv_algo_search: Literal["heuristic", "exhaustive", "default"] = "exhaustive"

    @classmethod
    def from_settings(cls, settings) -> SessionOptions:
        return cls(
            providers=settings.providers,
            allow_provider_fallback=settings.allow_provider_fallback,
            intra_op_threads=settings.intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            allow_spinning=settings.ort_allow_spinning,
            spin_us=settings.ort_spin_us,
            stop_spinning_after_run=not settings.ort_keep_spinning_after_run,
            cuda_conv_algo_search=settings.cuda_conv_algo_search,
        )

    def session_keywords(self) -> dict[str, Any]:
        """The keywords of :func:`serving.sessions.open_session` these options stand for."""
        return {
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "allow_spinning": self.allow_spinning,
            "spin_us": self.spin_us,
            "stop_spinning_after_run": self.stop_spinning_after_run,
            "cuda_conv_algo_search": self.cuda_conv_algo_search,
        }


def provider_chain(requested: str, available: Sequence[str]) -> list[str]:
    """The ORT provider list for a requested provider name.

    ``auto`` tries CUDA when this onnxruntime build has it, then CPU; ``cuda``
    requires the CUDA provider in this build; ``cpu`` is CPU only.
    """
    if requested == "cpu":
        return [CPU]
    if requested == "cuda":
        if CUDA not in available:
            raise ModelLoadError(
                "providers=cuda, but this onnxruntime build has no CUDAExecutionProvider "
                f"(available: {', '.join(available)}); install onnxruntime-gpu, or use providers=cpu/auto"
            )
        return [CUDA, CPU]
    if requested == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise ModelLoadError(f"unknown providers={requested!r}; accepted: auto, cpu, cuda")


def check_provider(requested: str, chain: Sequence[str], actual: str, allow_fallback: bool) -> None:
    """Refuse a silent CUDA → CPU fallback when CUDA was explicitly requested.

    ORT quietly drops a provider that fails to initialise (no GPU, missing cuDNN);
    with ``providers=cuda`` that is an error unless ``allow_fallback``. With
    ``auto`` falling back is the point, and is only logged.
    """
    if chain[0] == actual:
        return
    message = f"requested {chain[0]} but ONNX Runtime is using {actual}"
    if requested == "cuda" and not allow_fallback:
        raise ModelLoadError(
            message + " (CUDA failed to initialise: no GPU visible, or CUDA/cuDNN libraries missing); "
            "set EED_ALLOW_PROVIDER_FALLBACK=1 to run on CPU anyway"
        )
    log.warning("%s; continuing on %s", message, actual)


@dataclass
class Graph:
    """One ONNX Runtime session and the names it is fed and read with."""

    name: str  # "exit2", "stage2"
    kind: Literal["exit", "stage", "cascade"]
    exit: int
    session: ort.InferenceSession
    input_name: str
    output_names: list[str]
    provider: str
    source: Path | None = None  # the model file the session was opened on (None: built in memory)
    # A session for lone requests: one-thread when that measured faster on the CPU, or
    # any session on the GPU, where each session keeps one input shape (ModelRuntime.choose_lone_sessions).
    lone_session: ort.InferenceSession | None = None
    # The one-thread lone session while lone requests are back on ``session`` (LoneThreadsJudge).
    spare_lone_session: ort.InferenceSession | None = None

    def feeds(self, batch: Any) -> dict[str, Any]:
        """The session's input dict for ``batch``."""
        return {self.input_name: batch}

    def run(self, batch: Any) -> list[np.ndarray]:
        """Run a batch; returns [logits] or [logits, features]."""
        return self.session.run(self.output_names, self.feeds(batch))

    def run_alone(self, batch: Any) -> list[np.ndarray]:
        """Run a lone request's batch of 1 (nothing else running): the same outputs as ``run``."""
        return (self.lone_session or self.session).run(self.output_names, self.feeds(batch))

    def pads_batches(self) -> bool:
        """Whether batches are padded to max_batch_size, one input shape per session.

        On the GPU a batch of 32 small images costs little more than one (full-width
        CIFAR ResNet-18 on an H200: 0.77 vs 0.51 ms), but a session whose input shape
        changes rebuilds its cuDNN convolution plans: with batches of every size the
        server's runs took 2.8–3.2 ms at 1.1–1.3 images each, the CPU time in cuDNN's
        heuristics and graph building (py-spy). On the CPU a batch costs what its
        images cost, so nothing is padded there. Lone requests keep batch 1 on sessions
        of their own (:meth:`ModelRuntime.choose_lone_sessions`).
        """
        return self.provider != CPU

    def feed(self, x: np.ndarray, stage_inputs: Sequence[np.ndarray]) -> Any:
        """This graph's input for image batch ``x`` (``stage_inputs``: every stage's input for it)."""
        return x if self.kind == "exit" else stage_inputs[self.exit - 1]


# Stage chain against full path: providers and kernels differ by far less than this share of
# the logits' scale (a CUDA provider's TF32 convolutions by ~1e-3); graphs of another export or
# another exit differ by the logits themselves.
MIXED_EXPORT_RTOL = 0.05

# How many of its latest idle-time timings each way the judge of lone requests' threads keeps.
LONE_TIMINGS_REMEMBERED = 8


@dataclass
class LoneThreadsJudge:
    """Keeps start-up's choice of one-thread sessions for lone requests honest while serving.

    :meth:`ModelRuntime.choose_lone_sessions` times the main exit both ways for about a second at
    start-up. A server starting beside another one's start-up (two replicas on one 2-core host)
    timed it at 12.7 ms on one thread against 15.9 ms on all cores (7.0 on a quiet host), chose
    one-thread sessions and served every lone request on one thread for the rest of its life —
    twice the latency (docs/request-path-profile.md, eleventh session). So when start-up chose
    one-thread sessions, the server's idle-time prober times the main exit again now and then,
    one way at a time (:meth:`ModelRuntime.time_lone_way`), and lone requests follow the fastest
    of each way's recent timings — a way's own cost, which a busy moment only adds to. One thread
    is taken when it is ``min_gain`` faster (start-up's rule) and kept until it is no faster at
    all, so a ratio near the threshold does not move lone requests back and forth.
    """

    min_gain: float
    all_cores: deque = field(default_factory=lambda: deque(maxlen=LONE_TIMINGS_REMEMBERED))
    one_thread: deque = field(default_factory=lambda: deque(maxlen=LONE_TIMINGS_REMEMBERED))

    def observe(self, one_thread: bool, seconds: float) -> None:
        """One batch-1 main-exit run's time, on the one-thread session or the all-core one."""
        (self.one_thread if one_thread else self.all_cores).append(seconds)

    def prefers_one_thread(self, now_one_thread: bool) -> bool:
        """Whether lone requests should run on one-thread sessions, given where they run now."""
        ratio = min(self.one_thread) / min(self.all_cores)
        return ratio <= 1.0 if now_one_thread else ratio <= 1 - self.min_gain

    def detail(self) -> str:
        return (
            f"main exit at batch 1: {min(self.one_thread) * 1e3:.3f} ms on one thread vs "
            f"{min(self.all_cores) * 1e3:.3f} ms on all cores"
        )


@dataclass
class ModelRuntime:
    """All sessions of one model folder."""

    model_dir: Path
    manifest: Manifest
    exits: list[Graph]  # full-path graphs, index 0 = exit 1
    stages: list[Graph]  # stage graphs, index 0 = stage 1
    provider: str
    consistency: dict[str, float] = field(default_factory=dict)
    lone_sessions: str = "the same sessions as batches (not measured)"  # set by choose_lone_sessions
    # open_session keywords of the lone-request sessions, when choose_lone_sessions chose them.
    lone_keywords: dict[str, Any] | None = None
    # The confidence cascade fused into one graph (serving/fused.py), when chosen.
    fused: Graph | None = None
    # Re-judges one-thread lone sessions while serving; None unless choose_lone_sessions chose them.
    lone_judge: LoneThreadsJudge | None = None

    @property
    def graphs(self) -> list[Graph]:
        return [*self.exits, *self.stages, *([self.fused] if self.fused is not None else [])]

    @classmethod
    def load(cls, model_dir: str | Path, options: SessionOptions = SessionOptions()) -> ModelRuntime:
        """Verify the folder's checksums and open a session for every graph.

        Raises :class:`ModelLoadError` (or ManifestError) with a message that names
        the file and what is wrong with it.
        """
        model_dir = Path(model_dir)
        manifest = load_manifest(model_dir, verify=True)
        chain = provider_chain(options.providers, ort.get_available_providers())
        io = manifest.io
        k = manifest.num_exits
        image = (manifest.input.channels, manifest.input.height, manifest.input.width)
        exits, stages = [], []
        for spec in manifest.exits:
            exits.append(
                _open(
                    model_dir / spec.path,
                    f"exit{spec.exit}",
                    "exit",
                    spec.exit,
                    io.image_input,
                    [io.logits_output],
                    chain,
                    options,
                    image,
                )
            )
            stage_input = io.image_input if spec.exit == 1 else io.features_input
            stage_outputs = [io.logits_output] + ([io.features_output] if spec.exit < k else [])
            stages.append(
                _open(
                    model_dir / spec.stage,
                    f"stage{spec.exit}",
                    "stage",
                    spec.exit,
                    stage_input,
                    stage_outputs,
                    chain,
                    options,
                    image if spec.exit == 1 else None,
                )
            )
        actual = {g.provider for g in exits + stages}
        if len(actual) != 1:
            raise ModelLoadError(f"graphs ended up on different providers: {sorted(actual)}")
        provider = actual.pop()
        check_provider(options.providers, chain, provider, options.allow_provider_fallback)
        return cls(model_dir=model_dir, manifest=manifest, exits=exits, stages=stages, provider=provider)

    def example_input(self, batch: int = 1, seed: int = 0) -> np.ndarray:
        """A random input batch of the manifest's shape (for warm-up and checks)."""
        spec = self.manifest.input
        rng = np.random.default_rng(seed)
        return rng.standard_normal((batch, spec.channels, spec.height, spec.width), dtype=np.float32)

    def warm_up(self, max_batch_size: int, runs: int = 3) -> None:
        """Run every graph at batch 1 and at the largest batch, checking output shapes.

        The stage chain is driven with real features, so feature shapes never have to
        be guessed from (possibly symbolic) graph metadata. Allocating the largest
        batch once keeps ORT's arena from growing under the first burst of traffic.
        """
        num_classes = self.manifest.num_classes
        for batch in sorted({1, max_batch_size}):
            x = self.example_input(batch)
            for _ in range(runs if batch == 1 else 1):
                for graph in self.exits:
                    (logits,) = _run_checked(graph, x)
                    _check_logits(graph, logits, batch, num_classes)
                features = x
                for graph in self.stages:
                    outputs = _run_checked(graph, features)
                    _check_logits(graph, outputs[0], batch, num_classes)
                    if len(outputs) > 1:
                        features = outputs[1]

    def stage_inputs(self, x: np.ndarray) -> list[np.ndarray]:
        """The input of every stage graph for image batch ``x`` (index 0 is ``x``)."""
        return [inp for inp, _ in run_chain([g.run for g in self.stages], x)]

    def calibrate(self, runs: int = 10, batch_sizes: Sequence[int] = (1,)) -> dict[str, list[tuple[int, float]]]:
        """Time every graph ``runs`` times at each batch size (batch 1 as a lone request runs).

        Returns graph name → (batch size, seconds) per run: the prior of the service
        time models behind deadlines (two sizes give them a slope per item).
        """
        timings: dict[str, list[tuple[int, float]]] = {g.name: [] for g in self.graphs}
        for size in dict.fromkeys(max(1, int(b)) for b in batch_sizes):
            x = self.example_input(size, seed=1)
            inputs = self.stage_inputs(x)
            for graph in self.graphs:
                feed = graph.feed(x, inputs)
                run = graph.run_alone if size == 1 else graph.run
                for _ in range(runs):
                    t0 = time.perf_counter()
                    run(feed)
                    timings[graph.name].append((size, time.perf_counter() - t0))
        return timings

    def choose_lone_sessions(self, options: SessionOptions, min_gain: float = 0.1, rounds: int = 6) -> str:
        """Give lone requests one-thread sessions when that measures faster at batch 1.

        A small model's operators at batch 1 are too small to split between threads: waking the
        sleeping pool thread for each costs more than it saves (shipped model, main exit with
        idle gaps between runs as a server has them: 0.32 ms on one thread, 0.38 ms on two).
        Only when ORT picks the thread count (``intra_op_threads`` 0) on the CPU: times the main
        exit both ways in alternating blocks, runs 0.5 ms apart, and opens a one-thread session
        for every graph when it is at least ``min_gain`` faster. Batches keep the all-core
        sessions. On other providers every graph gets a lone-request session unmeasured: each
        session keeps one input shape there (:meth:`Graph.pads_batches`). Call it before
        :func:`serving.fused.attach_fused_cascade`, which opens the fused graph's lone session
        with ``lone_keywords``. Returns a one-line reason, also logged and shown by ``GET /v1/model``.
        """
        main = self.exits[-1]
        if self.provider != CPU:
            # One input shape per session (Graph.pads_batches): batches padded to the largest
            # size in the batch sessions, lone requests at batch 1 in sessions of their own.
            chain = provider_chain(options.providers, ort.get_available_providers())
            self.lone_keywords = options.session_keywords()
            x = self.example_input(1, seed=7)
            inputs = self.stage_inputs(x)
            for graph in self.graphs:
                if graph.source is not None:  # the fused cascade opens its own (attach_fused_cascade)
                    graph.lone_session = open_session(graph.source, chain, **self.lone_keywords)
                    graph.run_alone(graph.feed(x, inputs))  # its one shape, planned now
            self.lone_sessions = f"sessions of their own at batch 1 ({self.provider}: one input shape per session)"
            log.info("lone requests of %s run on %s", self.manifest.name, self.lone_sessions)
            return self.lone_sessions
        if options.intra_op_threads != 0 or main.source is None:
            self.lone_sessions = "the same sessions as batches (thread count configured, or no model file)"
            return self.lone_sessions
        keywords = {**options.session_keywords(), "intra_op_threads": 1}
        candidate = open_session(main.source, [CPU], **keywords)
        x = self.example_input(1, seed=7)
        feeds = main.feeds(x)
        t0 = time.perf_counter()
        candidate.run(main.output_names, feeds)  # warm-up, and the cost of one run
        # About a second of measuring at most: a large model loads no slower for it.
        rounds = max(1, min(rounds, int(1.0 / (24 * max(time.perf_counter() - t0, 1e-6)))))
        timings: dict[str, list[float]] = {"all cores": [], "one thread": []}
        for _ in range(rounds):
            for label, session in (("all cores", main.session), ("one thread", candidate)):
                block = []
                for _ in range(12):
                    time.sleep(0.0005)
                    t0 = time.perf_counter()
                    session.run(main.output_names, feeds)
                    block.append(time.perf_counter() - t0)
                timings[label].append(float(np.median(block[2:])))
        # The best block of each: a block that another process's work (replicas starting side by
        # side) slowed down says nothing about the server's cores once they are its own, and such
        # contention slows an all-core run far more than a one-thread run.
        judge = LoneThreadsJudge(min_gain)  # the same rule decides now and, if kept, while serving
        judge.observe(False, min(timings["all cores"]))
        judge.observe(True, min(timings["one thread"]))
        if not judge.prefers_one_thread(now_one_thread=False):
            self.lone_sessions = f"the same sessions as batches ({judge.detail()})"
        else:
            self.lone_keywords = keywords
            for graph in self.graphs:  # a graph built in memory (the fused cascade) opens its own
                if graph.source is not None:
                    graph.lone_session = candidate if graph is main else open_session(graph.source, [CPU], **keywords)
            self.lone_sessions = f"one-thread sessions ({judge.detail()})"
            self.lone_judge = judge
        log.info("lone requests of %s run on %s", self.manifest.name, self.lone_sessions)
        return self.lone_sessions

    def time_lone_way(self, one_thread: bool) -> float:
        """One batch-1 run of the main exit on its one-thread session or its all-core one, in
        seconds: what a lone request after an idle spell pays that way (ORT's threads woken,
        the weights reloaded). Only while one-thread lone sessions exist."""
        main = self.exits[-1]
        session = (main.lone_session or main.spare_lone_session) if one_thread else main.session
        assert session is not None, "no one-thread session to time (choose_lone_sessions chose none)"
        feeds = main.feeds(self.example_input(1, seed=7))
        started = time.perf_counter()
        session.run(main.output_names, feeds)
        return time.perf_counter() - started

    @property
    def lone_on_one_thread(self) -> bool:
        """Whether lone requests run on one-thread sessions now."""
        return self.lone_judge is not None and self.exits[-1].lone_session is not None

    def use_one_thread_lone_sessions(self, one_thread: bool) -> None:
        """Move lone requests to their one-thread sessions or back to the batch sessions (the
        one-thread ones are kept to come back to). Only after choose_lone_sessions chose them."""
        assert self.lone_judge is not None, "no one-thread lone sessions to move between"
        if one_thread == self.lone_on_one_thread:
            return
        for graph in self.graphs:
            if one_thread:
                graph.lone_session, graph.spare_lone_session = graph.spare_lone_session, None
            else:
                graph.spare_lone_session, graph.lone_session = graph.lone_session, None
        where = "one-thread sessions" if one_thread else "the same sessions as batches"
        self.lone_sessions = f"{where} (re-judged while idle; {self.lone_judge.detail()})"
        log.info("lone requests of %s now run on %s", self.manifest.name, self.lone_sessions)

    def check_consistency(self, batch: int = 2) -> dict[str, float]:
        """Max |logits(stage chain) − logits(full path)| per exit on a random batch.

        The exporter guarantees these agree; a large value means the folder mixes
        graphs from different exports (or names them under the wrong exits). Logged, and
        reported by GET /v1/model; a disagreement no numerical difference between
        providers explains (above :data:`MIXED_EXPORT_RTOL` of the logits' scale) refuses
        the model: answers would report one exit's cost and accuracy for another's logits.
        """
        x = self.example_input(batch, seed=2)
        inputs = self.stage_inputs(x)
        result, scale = {}, 1.0
        for exit_graph, stage_graph, feed in zip(self.exits, self.stages, inputs):
            full = exit_graph.run(x)[0]
            chained = stage_graph.run(feed)[0]
            result[exit_graph.name] = float(np.max(np.abs(full - chained)))
            scale = max(scale, float(np.max(np.abs(full))))
        if max(result.values()) > 1e-3 * scale:
            log.warning("stage chain and full-path graphs disagree (max |diff| per exit: %s)", result)
        mixed = [name for name, diff in result.items() if diff > MIXED_EXPORT_RTOL * scale]
        if mixed:
            raise ModelLoadError(
                f"{self.manifest.name}: the stage chain and the full-path graph of {', '.join(mixed)} give "
                f"different logits (max |diff| per exit: { {k: round(v, 4) for k, v in result.items()} }, "
                f"logits up to {scale:.3g}): the folder mixes graphs of different exports or names them "
                "under the wrong exits; export the checkpoint again into an empty folder"
            )
        self.consistency = result
        return result


def _open(
    path: Path,
    name: str,
    kind: Literal["exit", "stage"],
    exit_number: int,
    input_name: str,
    output_names: list[str],
    chain: Sequence[str],
    options: SessionOptions,
    image_shape: tuple[int, int, int] | None = None,
) -> Graph:
    """The graph's session, its inputs and outputs checked by name and type (and, given
    ``image_shape``, its image input's declared (C, H, W))."""
    try:
        session = open_session(path, chain, **options.session_keywords())
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise ModelLoadError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if input_name not in inputs:
        raise ModelLoadError(f"{path.name} has inputs {inputs}; the manifest's io says {input_name!r}")
    missing = [n for n in output_names if n not in outputs]
    if missing:
        raise ModelLoadError(f"{path.name} has outputs {outputs}; expected {output_names} (missing {missing})")
    # The server feeds float32 and reads float32: an integer logits output loaded and answered from
    # truncated logits; a float64 one failed at warm-up in ONNX Runtime's words.
    used = [a for a in (*session.get_inputs(), *session.get_outputs()) if a.name in (input_name, *output_names)]
    wrong = [f"{a.name} is {a.type}" for a in used if a.type != "tensor(float)"]
    if wrong:
        raise ModelLoadError(
            f"{path.name}: {', '.join(wrong)}; the server feeds and reads float32 (tensor(float)) only — "
            "export the checkpoint again with python -m training.export"
        )
    if image_shape is not None:
        declared = next(a.shape for a in session.get_inputs() if a.name == input_name)
        if len(declared) != 4 or any(isinstance(d, int) and d != e for d, e in zip(declared[1:], image_shape)):
            c, h, w = image_shape
            raise ModelLoadError(
                f"{path.name} takes {input_name} of shape {declared}; the manifest's input says [N, {c}, {h}, {w}] "
                "(input.channels, height, width): the manifest belongs to another export, or those fields are wrong"
            )
    return Graph(
        name=name,
        kind=kind,
        exit=exit_number,
        session=session,
        input_name=input_name,
        output_names=output_names,
        provider=session.get_providers()[0],
        source=path,
    )


def _run_checked(graph: Graph, x: np.ndarray) -> list[np.ndarray]:
    """``graph.run(x)`` at warm-up, a failure named by graph and file (a stage that does not take
    the features its predecessor gives fails only here, in ONNX Runtime's words)."""
    try:
        return graph.run(x)
    except Exception as exc:  # ORT's own exception types
        what = (
            "the manifest's input shape" if graph.kind == "exit" or graph.exit == 1 else "the previous stage's features"
        )
        where = graph.source.name if graph.source else "in memory"
        raise ModelLoadError(
            f"{graph.name} ({where}) fails on {what} {list(x.shape)}: {exc}; the folder mixes graphs "
            "of different exports or its manifest is wrong — export the checkpoint again into an empty folder"
        ) from None


def _check_logits(graph: Graph, logits: np.ndarray, batch: int, num_classes: int) -> None:
    if logits.shape != (batch, num_classes):
        raise ModelLoadError(
            f"{graph.name}: logits have shape {logits.shape}, expected ({batch}, {num_classes}) "
            "— the graph needs a dynamic batch axis and one logit per class in the manifest"
        )
    if not np.all(np.isfinite(logits)):
        raise ModelLoadError(f"{graph.name}: non-finite logits on a random input")


__all__ = [
    "CPU",
    "CUDA",
    "Graph",
    "ManifestError",
    "ModelLoadError",
    "ModelRuntime",
    "SessionOptions",
    "check_provider",
    "provider_chain",
]
