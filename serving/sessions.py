"""ONNX Runtime sessions and stage chains: one implementation for the server and the exporter.

The server (``serving.runtime``) opens every graph of a model folder with its
settings' thread and provider options; the exporter (``training.export``) opens the
graphs it just wrote on the CPU to check them against PyTorch and to measure their
accuracy. Both build sessions with :func:`open_session` and run stage graphs in turn
with :func:`run_chain`, so what the exporter verifies is what the server runs.
Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

StageFn = Callable[[np.ndarray], Sequence[np.ndarray]]

# The server's default bound on ORT's spinning (EED_ORT_SPIN_US; serving.runtime.SessionOptions):
# bridges the gaps between one run's operators, not the idle time between requests.
DEFAULT_SPIN_US = 3000


def open_session(
    path_or_bytes,
    providers: Sequence[str] = (CPU,),
    *,
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    allow_spinning: bool = False,
    spin_us: int = 0,
    stop_spinning_after_run: bool = True,
    cuda_conv_algo_search: str = "exhaustive",
) -> ort.InferenceSession:
    """A session on a model file (or serialized model) with full graph optimisation and quiet
    logs; raises what ONNX Runtime raises. ``cuda_conv_algo_search`` applies where the CUDA
    provider is in ``providers`` (see :func:`provider_entries`).

    Spinning of ORT's intra-op threads: ``allow_spinning`` = ORT's own default (threads
    busy-wait long after a run: tens of ms of CPU per isolated request); otherwise
    ``spin_us`` > 0 bounds the busy-wait to that many microseconds, enough to bridge the
    gaps between one run's operators; 0 = none. With bounded spinning the threads stop
    spinning when a run ends (``stop_spinning_after_run``, ORT's ``session.force_spinning_stop``)
    unless told otherwise: every session has a thread pool of its own, and threads still spinning
    after one graph's run take the cores the next graph's run needs — a cascade's stages in turn,
    or requests for different exits one after another. In-process, full-width export, batch 1,
    2 cores: the four stage graphs in turn 7.1 ms stopped vs 11.7 ms spinning on, the main exit
    right after them 5.3 vs 9.4 ms (``benchmarks/ort_spinning.py``, ``ort_spinning.json``).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = inter_op_threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning or spin_us > 0 else "0")
    if spin_us > 0 and not allow_spinning:
        so.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
        so.add_session_config_entry("session.force_spinning_stop", "1" if stop_spinning_after_run else "0")
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    return ort.InferenceSession(source, sess_options=so, providers=provider_entries(providers, cuda_conv_algo_search))


def provider_entries(providers: Sequence[str], cuda_conv_algo_search: str) -> list:
    """ORT's providers argument: the names, the CUDA provider with its options.

    ``cuda_conv_algo_search``: EXHAUSTIVE (ORT's own default) benchmarks every cuDNN algorithm
    the first time a convolution sees an input shape; the server pads batches so that each
    session sees one shape (``Graph.pads_batches``) and the search runs once, at warm-up.
    HEURISTIC asks cuDNN's heuristics instead (no benchmarking: for shapes that vary).
    """
    search = cuda_conv_algo_search.upper()
    if search not in ("HEURISTIC", "EXHAUSTIVE", "DEFAULT"):
        raise ValueError(f"cuda_conv_algo_search={cuda_conv_algo_search!r}; accepted: heuristic, exhaustive, default")
    return [(p, {"cudnn_conv_algo_search": search}) if p == CUDA else p for p in providers]


def run_chain(stages: Sequence[StageFn], x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run stage graphs 1, 2, ... in turn on batch ``x``, the trunk computed once.

    Each stage maps its input to ``[logits]`` or ``[logits, features]``; the features
    feed the next stage. Returns, per stage run, ``(its input, its logits)``.
    """
    results = []
    for stage in stages:
        outputs = stage(x)
        results.append((x, outputs[0]))
        if len(outputs) < 2:
            break
        x = outputs[1]
    return results
