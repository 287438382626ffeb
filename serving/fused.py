"""A confidence cascade in one ONNX Runtime call: the stage graphs fused into one graph.

Served stage by stage, a cascade pays per stage one batcher wake-up, one hand-off to
the inference thread and back, and a stopping score in Python — on a small model as much
time as the stage's compute, so a cascade that spends half the GFLOPs of the main exit
saves almost no time (docs/request-path-profile.md). This module builds, from a model
folder's stage graphs, one graph that runs the whole cascade per sample:

    inputs:  image [N, C, H, W] float32, thresholds [N, k-1] float64 (one row per sample)
    outputs: logits [N, classes] float32 of the exit that answered, exit [N] int64 (1..k)

Stage i runs on the samples still going; each sample's top softmax probability is
computed in float64 exactly as :func:`serving.cascade.top_probability` does
(``1 / sum(exp(z - max z))``) and compared with its own threshold for that exit
(:func:`serving.cascade.stops_at`: not below it, within the tie slack, so a NaN score
stops); the survivors are gathered (``Compress``)
and, only if there are any, fed to the next stage inside an ``If``; their answers are
scattered back (``ScatterND``). Thresholds are per sample, so one batch can mix
policies; a plan that may go no deeper than exit e sets thresholds e.. to 0 (every
sample stops there). Deadlines stay stage by stage (:mod:`serving.service`): they
decide between stages from the load at that moment.

Building needs the ``onnx`` package; without it the server keeps the stage path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from . import cascade
from .batching import GraphWorker
from .errors import ModelLoadError
from .runtime import Graph, ModelRuntime, SessionOptions, provider_chain
from .sessions import open_session

log = logging.getLogger("serving.fused")

# Names of the fused graph's inputs and outputs.
IMAGE, THRESHOLDS, LOGITS, EXIT = "image", "thresholds", "logits", "exit"


def build_fused_cascade(
    stage_paths: Sequence[Path], image_input: str, features_input: str, logits_output: str, features_output: str
):
    """Return the fused cascade as an ``onnx.ModelProto`` (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper

    stages = [onnx.load(str(p)) for p in stage_paths]
    k = len(stages)
    opset = max(op.version for m in stages for op in m.opset_import if op.domain in ("", "ai.onnx"))
    opset = max(opset, 18)  # Reduce* with axes as an input
    initializers = []

    def const(name: str, value, dtype) -> str:
        initializers.append(helper.make_tensor(name, dtype, np.shape(value), np.ravel(value).tolist()))
        return name

    axis_last = const("fc/axis_last", [-1], TensorProto.INT64)
    one = const("fc/one", 1.0, TensorProto.DOUBLE)
    zero_i = const("fc/zero_i64", 0, TensorProto.INT64)

    def stage_nodes(i: int, feed: str, weights: list) -> tuple[list, str, str | None]:
        """Stage i's nodes with every name prefixed, reading ``feed``; returns (nodes, logits, features).

        Its weights go to ``weights``: the initializers of the (sub)graph that runs the
        stage, not an outer one — ORT pre-packs convolution weights only for a graph's
        own constant initializers, not for values captured from an enclosing scope.
        """
        graph = stages[i - 1].graph
        prefix = f"s{i}/"
        source = image_input if i == 1 else features_input

        def rename(name: str) -> str:
            if not name:
                return name
            if name == source:
                return feed
            return prefix + name

        for t in graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(t)
            copy.name = prefix + t.name
            weights.append(copy)
        nodes = []
        for n in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            del copy.input[:]
            del copy.output[:]
            copy.input.extend(rename(x) for x in n.input)
            copy.output.extend(rename(x) for x in n.output)
            copy.name = prefix + (n.name or n.output[0])
            nodes.append(copy)
        outputs = {o.name for o in graph.output}
        return nodes, prefix + logits_output, (prefix + features_output if features_output in outputs else None)

    def exit_const(i: int, like: str, nodes: list) -> str:
        """An int64 [n] tensor filled with ``i``, n = rows of ``like``."""
        shape, out = f"fc/l{i}/rows", f"fc/l{i}/exit_{len(nodes)}"
        nodes.append(helper.make_node("Shape", [like], [shape], end=1))
        nodes.append(
            helper.make_node(
                "ConstantOfShape", [shape], [out], value=helper.make_tensor("v", TensorProto.INT64, [1], [i])
            )
        )
        return out

    def level(i: int, feed: str, thresholds: str, weights: list) -> tuple[list, str, str]:
        """Nodes that answer every row of ``feed`` from exits i..k: (nodes, logits, exit)."""
        nodes, logits, features = stage_nodes(i, feed, weights)
        if i == k:
            return nodes, logits, exit_const(i, logits, nodes)
        assert features is not None, f"stage {i} of {k} has no features output"
        p = f"fc/l{i}/"
        nodes += [
            helper.make_node("Cast", [logits], [p + "z"], to=TensorProto.DOUBLE),
            helper.make_node("ReduceMax", [p + "z", axis_last], [p + "zmax"], keepdims=1),
            helper.make_node("Sub", [p + "z", p + "zmax"], [p + "zc"]),
            helper.make_node("Exp", [p + "zc"], [p + "e"]),
            helper.make_node("ReduceSum", [p + "e", axis_last], [p + "s"], keepdims=0),
            helper.make_node("Div", [one, p + "s"], [p + "top"]),
            helper.make_node("Gather", [thresholds, const(p + "col", i - 1, TensorProto.INT64)], [p + "t"], axis=1),
            # go on only where the score is below the threshold: a NaN score stops (as
            # cascade.stops_at), so a capped row never runs past its deepest exit
            helper.make_node("Less", [p + "top", p + "t"], [p + "go"]),
            helper.make_node("Cast", [p + "go"], [p + "go_i"], to=TensorProto.INT64),
            helper.make_node("ReduceSum", [p + "go_i"], [p + "n_go"], keepdims=0),
            helper.make_node("Greater", [p + "n_go", zero_i], [p + "any"]),
        ]
        here = exit_const(i, logits, nodes)
        # then: run the survivors through the next stages and scatter their answers back
        sub_nodes = [
            helper.make_node("NonZero", [p + "go"], [p + "idx_row"]),
            helper.make_node("Transpose", [p + "idx_row"], [p + "idx"], perm=[1, 0]),
            helper.make_node("Compress", [features, p + "go"], [p + "f_next"], axis=0),
            helper.make_node("Compress", [thresholds, p + "go"], [p + "t_next"], axis=0),
        ]
        sub_weights: list = []
        deeper, deep_logits, deep_exit = level(i + 1, p + "f_next", p + "t_next", sub_weights)
        sub_nodes += deeper
        sub_nodes += [
            helper.make_node("ScatterND", [logits, p + "idx", deep_logits], [p + "then_logits"]),
            helper.make_node("ScatterND", [here, p + "idx", deep_exit], [p + "then_exit"]),
        ]
        out_types = lambda tag: [  # noqa: E731
            helper.make_tensor_value_info(p + tag + "_logits", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(p + tag + "_exit", TensorProto.INT64, None),
        ]
        then_graph = helper.make_graph(sub_nodes, p + "then", [], out_types("then"), initializer=sub_weights)
        else_graph = helper.make_graph(
            [
                helper.make_node("Identity", [logits], [p + "else_logits"]),
                helper.make_node("Identity", [here], [p + "else_exit"]),
            ],
            p + "else",
            [],
            out_types("else"),
        )
        nodes.append(
            helper.make_node(
                "If", [p + "any"], [p + "logits", p + "exit"], then_branch=then_graph, else_branch=else_graph
            )
        )
        return nodes, p + "logits", p + "exit"

    first = stages[0].graph.input[0]
    image_type = onnx.ValueInfoProto()
    image_type.CopyFrom(first)
    image_type.name = IMAGE
    nodes, logits, exit_ = level(1, IMAGE, THRESHOLDS, initializers)
    nodes += [helper.make_node("Identity", [logits], [LOGITS]), helper.make_node("Identity", [exit_], [EXIT])]
    graph = helper.make_graph(
        nodes,
        "fused_cascade",
        [image_type, helper.make_tensor_value_info(THRESHOLDS, TensorProto.DOUBLE, ["batch", k - 1])],
        [
            helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", None]),
            helper.make_tensor_value_info(EXIT, TensorProto.INT64, ["batch"]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="eed-serving-fused-cascade"
    )
    model.ir_version = max(m.ir_version for m in stages)
    return model


def cap_thresholds(thresholds: Sequence[float], deepest: int) -> np.ndarray:
    """One sample's threshold row for the fused graph: ``thresholds`` (one per early exit)
    lowered by the tie slack (:func:`serving.cascade.reach`, which the graph's plain
    comparison does not apply itself), with every exit from ``deepest`` on set to 0 so no
    sample goes past ``deepest``."""
    row = cascade.reach(thresholds).copy()
    row[deepest - 1 :] = 0.0
    return row


@dataclass
class FusedCascadeGraph(Graph):
    """The fused cascade's session; ``run`` takes (images, threshold rows) and returns [logits, exit]."""

    def feeds(self, batch: Any) -> dict[str, Any]:
        images, thresholds = batch
        return {IMAGE: images, THRESHOLDS: thresholds}

    def feed(self, x: np.ndarray, stage_inputs: Sequence[np.ndarray]) -> Any:
        return x, self.full_depth(len(x))

    def full_depth(self, batch: int) -> np.ndarray:
        """Threshold rows that never stop early (every stage runs): for warm-up and timing."""
        return np.full((batch, self.exit - 1), cascade.NEVER, dtype=np.float64)


def attach_fused_cascade(runtime: ModelRuntime, mode: str, options: SessionOptions, max_batch_size: int = 32) -> str:
    """Build the fused cascade for ``runtime``, check it, and set ``runtime.fused`` when it is chosen.

    ``mode``: ``stages`` never fuses; ``fused`` always does (an error when it cannot);
    ``auto`` fuses when the fused graph, timed at batch 1 through every stage, costs no
    more than the stage chain plus, per extra stage, what the stage path pays on top of
    ORT (its queue, batching loop and thread hand-off, timed with a graph that does
    nothing). Returns a one-line reason, also logged.
    """
    k = runtime.manifest.num_exits
    if mode == "stages" or k < 2:
        return _chosen(runtime, None, "stage by stage (configured)" if k > 1 else "one exit: nothing to fuse")
    if mode == "auto" and runtime.exits[0].pads_batches():
        # Inside the fused graph each stage sees as many rows as samples survive, a new shape
        # from call to call: on the GPU each costs cuDNN a new plan per convolution, which
        # padded stage graphs never pay (Graph.pads_batches).
        return _chosen(runtime, None, f"stage by stage (on {runtime.provider} the fused graph's shapes vary)")
    try:
        import onnx  # noqa: F401  (only to build the graph)
    except ImportError:
        if mode == "fused":
            raise ModelLoadError(
                "cascade_graph=fused needs the onnx package to build the graph: pip install onnx, "
                "or use cascade_graph=auto/stages"
            ) from None
        return _chosen(runtime, None, "stage by stage (the onnx package that builds the fused graph is not installed)")
    try:
        graph, fused_s, chain_s, hop_s = _build_and_time(runtime, options, k, max_batch_size)
    except Exception as exc:  # building, loading, checking or warming the graph: the stages still serve
        if mode == "fused":
            raise ModelLoadError(f"the fused cascade cannot be used: {str(exc)[:300]}") from exc
        return _chosen(runtime, None, f"stage by stage (the fused cascade cannot be used: {str(exc)[:200]})")
    detail = (
        f"fused {fused_s * 1e3:.3f} ms vs stage chain {chain_s * 1e3:.3f} ms + {k - 1} hand-offs of "
        f"{hop_s * 1e3:.3f} ms at batch 1"
    )
    if mode == "fused" or fused_s <= chain_s + (k - 1) * hop_s:
        return _chosen(runtime, graph, f"one ONNX Runtime call per batch ({detail})")
    return _chosen(runtime, None, f"stage by stage ({detail})")


def _build_and_time(runtime: ModelRuntime, options, k: int, max_batch_size: int):
    """The fused graph built, loaded, checked against the stage graphs, warmed and timed:
    (graph, fused s, stage chain s, hand-off s); ValueError when it disagrees with the stages."""
    io = runtime.manifest.io
    model = build_fused_cascade(
        [runtime.model_dir / e.stage for e in runtime.manifest.exits],
        io.image_input,
        io.features_input,
        io.logits_output,
        io.features_output,
    )
    chain = provider_chain(options.providers, ort.get_available_providers())
    serialized = model.SerializeToString()
    session = open_session(serialized, chain, **options.session_keywords())
    graph = FusedCascadeGraph(
        name="cascade",
        kind="cascade",
        exit=k,
        session=session,
        input_name=IMAGE,
        output_names=[LOGITS, EXIT],
        provider=session.get_providers()[0],
    )
    if runtime.lone_keywords is not None:  # lone requests on their own sessions (ModelRuntime.choose_lone_sessions)
        graph.lone_session = open_session(serialized, chain, **runtime.lone_keywords)
    problem = _check(runtime, graph)
    if problem:
        raise ValueError(f"it disagrees with the stage graphs: {problem}")
    for batch in sorted({1, max_batch_size}):
        x = runtime.example_input(batch, seed=4)
        graph.run((x, graph.full_depth(batch)))
    return (graph, *_timings(runtime, graph))


def _chosen(runtime: ModelRuntime, graph: FusedCascadeGraph | None, reason: str) -> str:
    runtime.fused = graph
    log.info("confidence cascades of %s run %s", runtime.manifest.name, reason)
    return reason


def _check(runtime: ModelRuntime, graph: FusedCascadeGraph, batch: int = 16) -> str | None:
    """Run the fused graph and the stage chain with the shared rule on one random batch; None if they agree."""
    x = runtime.example_input(batch, seed=5)
    conf, logits, feats = [], [], x
    for stage in runtime.stages:
        outputs = stage.run(feats)
        conf.append(cascade.top_probability(outputs[0]))
        logits.append(outputs[0])
        feats = outputs[-1]
    conf_arr = np.stack(conf, 1)
    k = runtime.manifest.num_exits
    thresholds = [float(np.median(conf_arr[:, i])) for i in range(k - 1)]
    deepest = [max(1, k - 1) if j % 3 == 0 else k for j in range(batch)]  # some rows capped below the main exit
    rows = np.stack([cap_thresholds(thresholds, d) for d in deepest])
    got_logits, got_exit = graph.run((x, rows))
    want_exit = np.array(
        [min(int(cascade.exits_taken(conf_arr[j : j + 1], thresholds)[0]), d) for j, d in enumerate(deepest)]
    )
    if not np.array_equal(got_exit, want_exit):
        return f"exits {got_exit.tolist()} vs {want_exit.tolist()}"
    want_logits = np.stack([logits[e - 1][j] for j, e in enumerate(want_exit)])
    scale = max(1.0, float(np.abs(want_logits).max()))
    if float(np.abs(got_logits - want_logits).max()) > 1e-3 * scale:
        return f"logits differ by {float(np.abs(got_logits - want_logits).max()):.3g}"
    return None


def _timings(runtime: ModelRuntime, graph: FusedCascadeGraph, pairs: int = 30) -> tuple[float, float, float]:
    """Batch-1 seconds: the fused graph through every stage, the stage chain, and what the
    stage path adds per extra stage on top of ORT (its batching queue, the hand-off to the
    inference thread and back, the stopping score of the stage's logits)."""
    x = runtime.example_input(1, seed=6)
    rows = graph.full_depth(1)
    logits = runtime.stages[0].run(x)[0]

    def stage_chain():
        feats = x
        for stage in runtime.stages:
            feats = stage.run(feats)[-1]

    async def hand_offs(pool, n: int = 60) -> float:
        # The stage path's own machinery with a graph that does nothing: queue, batching
        # loop, inference thread and back, then the stopping score of the stage's logits.
        worker = GraphWorker("hand-off", lambda batch: [batch], pool, 1, 0.0)
        worker.start()
        times = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                (out,) = await worker.submit(logits[0])
                cascade.top_probability(out)
                times.append(time.perf_counter() - t0)
        finally:
            await worker.stop()
        return float(np.median(times[10:]))

    with ThreadPoolExecutor(1) as pool:
        loop = asyncio.new_event_loop()
        try:
            hop = loop.run_until_complete(hand_offs(pool))
        finally:
            loop.close()
    fused, chain = [], []
    for _ in range(pairs):  # interleaved call by call, so a busy moment hits both
        t0 = time.perf_counter()
        graph.run((x, rows))
        t1 = time.perf_counter()
        stage_chain()
        fused.append(t1 - t0)
        chain.append(time.perf_counter() - t1)
    return float(np.median(fused)), float(np.median(chain)), hop
