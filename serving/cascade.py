"""The confidence-cascade rule and its cost accounting — one home for both sides.

Torch-free and HTTP-free, so the evaluation that calibrates thresholds
(``training.cascade``) and the server that applies them (``serving.service``) use
literally the same code: a policy calibrated offline answers the same way online.

The rule: evaluate exits 1, 2, ... in turn and stop at the first exit i < k whose
top softmax probability is >= ``thresholds[i-1]``; the main output (exit k) always
answers. A threshold of 0 therefore always stops at exit 1, and any threshold above
1 never stops early (a softmax probability is at most 1).

The cost of a sample that stopped at exit i is what the stage graphs of exits 1..i
cost together (DESIGN §2): the trunk up to stage i counted once, plus every head
evaluated on the way — ``cumsum(stage_gflops)[i-1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Any threshold above 1 means "never stop at this exit"; 2.0 keeps JSON finite.
NEVER = 2.0

# A score this close below a threshold (relative) counts as reaching it. The same top
# probability differs between the ways it is computed: the fused cascade graph's float32
# convolutions differ from the stage graphs' (ORT picks kernels per graph), by up to ~1e-6
# relative on the shipped model (tests/test_default_model.py measures it), and its float64
# Exp/ReduceSum from numpy's in the last bits. Without the slack a client that sends back the
# probability an answer reported, or a calibrated threshold that is itself a validation
# image's score, stops on one path and runs on along the other. 1e-5 is ten times that
# spread and far below any meaningful difference between thresholds.
TIE_RTOL = 1e-5

# Written into every calibrated manifest and compared with it at start-up (a manifest that records
# another rule is warned about), so it is built from TIE_RTOL: changing the slack changes the text.
RULE = (
    "evaluate exits in order; stop at the first exit i < k whose top softmax probability "
    f">= thresholds[i-1] (within a relative {TIE_RTOL:.0e} below 1); the last exit always answers. "
    "A threshold > 1 never stops."
).replace("e-0", "e-")


ThresholdsLike = float | Sequence[float] | np.ndarray  # one for all early exits, or one per early exit


def as_thresholds(thresholds: ThresholdsLike, num_exits: int) -> np.ndarray:
    """A shared scalar or one threshold per early exit → float64 array of length k-1."""
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim == 0:
        return np.full(num_exits - 1, float(t))
    if t.shape != (num_exits - 1,):
        raise ValueError(f"need one threshold per early exit ({num_exits - 1}), got {t.shape[0]}")
    return t


def reach(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """The scores that count as reaching ``thresholds``: each below 1 lowered by :data:`TIE_RTOL`;
    1 and above kept as they are, so that 1 still stops only a saturated softmax and above 1
    never stops (``confidence=1`` is "never stop early" in practice; lowered, it stopped 1.5 % of
    the shipped model's test images at an early exit)."""
    t = np.asarray(thresholds, dtype=np.float64)
    return np.where(t >= 1.0, t, t * (1.0 - TIE_RTOL))


def top_probability(logits: np.ndarray) -> np.ndarray:
    """Top softmax probability over the last axis: 1 / sum(exp(z - max z)), in float64.

    Written this way (not ``softmax(z).max()``) so it is never above 1 and costs one
    exp per class; ``serving.outputs.softmax(z).max()`` gives the same number.
    """
    z = np.asarray(logits, dtype=np.float64)
    return 1.0 / np.exp(z - z.max(-1, keepdims=True)).sum(-1)


def stops_at(top_prob: float, thresholds: np.ndarray, exit_number: int) -> bool:
    """Whether a sample whose exit ``exit_number`` has top probability ``top_prob`` stops there.

    ``thresholds`` holds one value per early exit (see :func:`as_thresholds`); the
    last exit always stops.
    """
    if exit_number > len(thresholds):
        return True
    # "not below", so a NaN score (a model overflowing on an extreme input) stops here, as in
    # the fused graph, rather than spending every later stage on it.
    t = float(thresholds[exit_number - 1])  # reach() in plain Python: this runs per stage per request
    return not top_prob < (t if t >= 1.0 else t * (1.0 - TIE_RTOL))


def exits_taken(conf: np.ndarray, thresholds: ThresholdsLike) -> np.ndarray:
    """1-based exit at which each sample stops, from (N, k) top probabilities.

    The vectorised form of :func:`stops_at` applied exit by exit.
    """
    n, k = conf.shape
    t = as_thresholds(thresholds, k)
    stop = np.zeros((n, k), dtype=bool)
    stop[:, : k - 1] = ~(conf[:, : k - 1] < reach(t))
    stop[:, k - 1] = True  # the main output always answers
    return stop.argmax(1) + 1  # argmax finds the first True


def cumulative_gflops(stage_gflops: Sequence[float]) -> np.ndarray:
    """Cost of a cascade that ran exits 1..i, for every i: the running sum of stage costs."""
    return np.cumsum(np.asarray(stage_gflops, dtype=np.float64))


def gflops_spent(
    gflops: Sequence[float], stage_gflops: Sequence[float], mode: str, exits_evaluated: Sequence[int]
) -> float:
    """GFLOPs actually spent on one request.

    ``mode == "single"``: the full path of the exit that answered (``gflops[i-1]``).
    Otherwise a cascade: every stage graph that ran, i.e. ``sum(stage_gflops[i-1])``
    over ``exits_evaluated`` — which equals ``cumulative_gflops`` at the last one.
    """
    if not exits_evaluated:
        return 0.0
    if mode == "single":
        return float(gflops[exits_evaluated[-1] - 1])
    return float(sum(stage_gflops[i - 1] for i in exits_evaluated))


@dataclass
class CascadeOutcome:
    """What a cascade did on a batch of samples."""

    exit: np.ndarray  # (N,) 1-based exit that answered
    prediction: np.ndarray  # (N,) class index of that exit
    gflops: np.ndarray  # (N,) GFLOPs spent on each sample

    def mean_gflops(self) -> float:
        return float(self.gflops.mean()) if len(self.gflops) else 0.0

    def exit_fractions(self, num_exits: int) -> list[float]:
        counts = np.bincount(self.exit, minlength=num_exits + 1)[1:]
        return (counts / max(1, len(self.exit))).tolist()


def simulate(
    conf: np.ndarray, pred: np.ndarray, thresholds: ThresholdsLike, stage_gflops: Sequence[float]
) -> CascadeOutcome:
    """The cascade on precomputed (N, k) top probabilities and predictions."""
    if len(stage_gflops) != conf.shape[1]:
        raise ValueError(f"{conf.shape[1]} exits in the scores but {len(stage_gflops)} stage costs")
    taken = exits_taken(conf, thresholds)
    rows = np.arange(len(taken))
    return CascadeOutcome(taken, pred[rows, taken - 1], cumulative_gflops(stage_gflops)[taken - 1])
