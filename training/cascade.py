"""Confidence cascades over a multi-exit network: cost accounting and threshold calibration.

Pure functions on numpy arrays of logits, shaped (N, k, C) with exits in order and the
main output last. Nothing here imports torch, so the server can reuse the same rule and
the same cost accounting as the evaluation that calibrated it.

The rule and its cost accounting (``serving.cascade``, shared with the server so a
policy calibrated here answers the same way there): evaluate exits 1, 2, ... in turn and
stop at the first exit i < k whose top softmax probability is >= ``thresholds[i-1]``; the
main output (exit k) always answers; a sample that stopped at exit i cost
``cumsum(stage_gflops)[i-1]``.

Calibration follows MSDNet's budgeted batch classification (Huang et al., ICLR 2018):
a family of per-exit thresholds, indexed by how the samples should split across exits
(a geometric distribution), is fitted on the validation split by quantiles of the
confidence; together with the single-threshold sweep these candidate policies are scored
on validation, and for a target mean cost (or accuracy) the best one is picked. Only the
validation split is ever used to pick thresholds.

Functions that take ``logits`` (``Logits``) also accept the ``ExitScores`` that ``confidences`` makes
of them, so scoring many policies on one split computes the softmax once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

# The rule and its cost accounting live in one torch-free module shared with the server.
from serving.cascade import (  # noqa: F401  (re-exported: callers import them from here too)
    NEVER,
    RULE,
    CascadeOutcome,
    ThresholdsLike,
    cumulative_gflops,
    exits_taken,
    reach,
    simulate,
    top_probability,
)
from serving.cascade import (
    as_thresholds as _as_thresholds,
)


@dataclass
class ExitScores:
    """Top softmax probability and predicted class per sample and exit, both (N, k).

    Computed once from the logits and shared by every policy scored on them.
    """

    conf: np.ndarray
    pred: np.ndarray

    @property
    def num_exits(self) -> int:
        return self.conf.shape[1]


Logits = np.ndarray | ExitScores  # (N, k, C) logits, or the scores computed from them once


def confidences(logits: Logits) -> ExitScores:
    """Scores of (N, k, C) logits, one exit at a time (bounded memory for 1000-class data)."""
    if isinstance(logits, ExitScores):
        return logits
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"logits must be (N, k, C), got shape {logits.shape}")
    n, k, _ = logits.shape
    conf, pred = np.empty((n, k)), np.empty((n, k), dtype=np.int64)
    for i in range(k):
        conf[:, i] = top_probability(logits[:, i])
        pred[:, i] = logits[:, i].argmax(-1)
    return ExitScores(conf, pred)


def run_cascade(logits: Logits, thresholds: ThresholdsLike, stage_gflops: Sequence[float]) -> CascadeOutcome:
    """Simulate the cascade on precomputed (N, k, C) logits: who answers, with what, at what cost."""
    scores = confidences(logits)
    return simulate(scores.conf, scores.pred, thresholds, stage_gflops)


@dataclass
class CascadePoint:
    """One policy scored on one split."""

    thresholds: list[float]
    accuracy: float
    mean_gflops: float
    exit_fractions: list[float]
    family: str = "shared"  # "shared" threshold or MSDNet's "geometric" per-exit thresholds
    parameter: float | None = None  # the shared threshold, or the geometric ratio

    def to_dict(self) -> dict:
        return asdict(self)


def score(
    logits: Logits,
    labels: np.ndarray,
    thresholds: ThresholdsLike,
    stage_gflops: Sequence[float],
    family: str = "shared",
    parameter: float | None = None,
) -> CascadePoint:
    """Accuracy and mean GFLOPs of one threshold policy on a labelled split."""
    scores = confidences(logits)
    k = scores.num_exits
    out = run_cascade(scores, thresholds, stage_gflops)
    accuracy = float((out.prediction == np.asarray(labels)).mean()) if len(labels) else 0.0
    return CascadePoint(
        _as_thresholds(thresholds, k).tolist(), accuracy, out.mean_gflops(), out.exit_fractions(k), family, parameter
    )


def default_threshold_grid() -> np.ndarray:
    """Shared thresholds to sweep: coarse below 0.9, dense close to 1 where trained nets sit."""
    near_one = 1.0 - np.logspace(-1, -6, 26)
    return np.unique(np.concatenate([[0.0], np.linspace(0.1, 0.9, 9), near_one, [1.0, NEVER]]))


def sweep(
    logits: Logits, labels: np.ndarray, stage_gflops: Sequence[float], grid: Iterable[float] | None = None
) -> list[CascadePoint]:
    """Score a single threshold shared by all early exits, for every threshold in ``grid``."""
    grid = default_threshold_grid() if grid is None else grid
    scores = confidences(logits)
    return [score(scores, labels, float(t), stage_gflops, "shared", float(t)) for t in grid]


def geometric_exit_distribution(ratio: float, num_exits: int) -> np.ndarray:
    """MSDNet's target share of samples per exit: proportional to ratio**i (i = 1..k)."""
    weights = ratio ** np.arange(1, num_exits + 1, dtype=np.float64)
    return weights / weights.sum()


def fit_quantile_thresholds(conf: np.ndarray, exit_shares: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-exit thresholds that make ``exit_shares[i]`` of the samples stop at exit i+1.

    MSDNet's ``dynamic_eval_find_threshold``: at each early exit, among the samples still
    running, the threshold is the confidence of the n-th most confident one, where n is
    that exit's share of all samples. Ties may let a few more samples stop.
    """
    n, k = conf.shape
    remaining = np.ones(n, dtype=bool)
    thresholds = np.full(k - 1, NEVER)
    for i in range(k - 1):
        want = int(np.floor(n * exit_shares[i]))
        candidates = np.sort(conf[remaining, i])[::-1]
        if want > 0 and len(candidates):
            thresholds[i] = candidates[min(want, len(candidates)) - 1]
        remaining &= conf[:, i] < reach(thresholds[i])  # those the rule does not stop, tie slack included
    return thresholds


def geometric_family(
    logits: Logits,
    labels: np.ndarray,
    stage_gflops: Sequence[float],
    ratios: Iterable[float] | None = None,
    fit_on: Logits | None = None,
) -> list[CascadePoint]:
    """MSDNet's per-exit threshold policies scored on ``logits``, their thresholds fitted on ``fit_on``
    (the validation split's) — or on ``logits`` themselves when none is given, as calibration does
    on the validation split."""
    ratios = np.arange(1, 40) / 20.0 if ratios is None else ratios  # MSDNet's grid: 0.05..1.95
    scores = confidences(logits)
    fitted = scores if fit_on is None else confidences(fit_on)
    points = []
    for r in ratios:
        t = fit_quantile_thresholds(fitted.conf, geometric_exit_distribution(float(r), scores.num_exits))
        points.append(score(scores, labels, t, stage_gflops, "geometric", float(r)))
    return points


def candidate_policies(logits: Logits, labels: np.ndarray, stage_gflops: Sequence[float]) -> list[CascadePoint]:
    """Every policy calibration chooses from, scored on the split given (validation)."""
    scores = confidences(logits)
    if scores.num_exits < 2:
        return []
    return sweep(scores, labels, stage_gflops) + geometric_family(scores, labels, stage_gflops)


def pareto_front(points: Sequence[CascadePoint]) -> list[CascadePoint]:
    """Points no other point beats on both cost and accuracy, cheapest first."""
    front: list[CascadePoint] = []
    for p in sorted(points, key=lambda p: (p.mean_gflops, -p.accuracy)):
        if not front or p.accuracy > front[-1].accuracy:
            front.append(p)
    return front


@dataclass
class Calibration:
    """A policy chosen on validation for a target, or the reason none fits."""

    target: dict
    chosen: CascadePoint | None
    reason: str = ""
    evaluated: dict = field(default_factory=dict)  # the same thresholds scored on other splits

    def to_dict(self) -> dict:
        d: dict = {"target": self.target, "thresholds": None, "val": None, "reason": self.reason or None}
        if self.chosen is not None:
            d["thresholds"] = self.chosen.thresholds
            d["family"] = self.chosen.family
            d["parameter"] = self.chosen.parameter
            d["val"] = {k: getattr(self.chosen, k) for k in ("accuracy", "mean_gflops", "exit_fractions")}
        d.update(self.evaluated)
        return d


def calibrate_for_budget(candidates: Sequence[CascadePoint], target_gflops: float) -> Calibration:
    """The most accurate candidate whose mean cost on validation is within the budget."""
    target = {"mean_gflops": float(target_gflops)}
    feasible = [p for p in candidates if p.mean_gflops <= target_gflops * (1 + 1e-9)]
    if not feasible:
        cheapest = min((p.mean_gflops for p in candidates), default=float("nan"))
        return Calibration(
            target,
            None,
            f"budget {target_gflops:.4g} GFLOPs is below the cheapest cascade "
            f"({cheapest:.4g} GFLOPs: every sample stops at exit 1)",
        )
    best = max(feasible, key=lambda p: (p.accuracy, -p.mean_gflops))
    return Calibration(target, best)


def calibrate_for_accuracy(candidates: Sequence[CascadePoint], target_accuracy: float) -> Calibration:
    """The cheapest candidate whose accuracy on validation reaches the target."""
    target = {"accuracy": float(target_accuracy)}
    feasible = [p for p in candidates if p.accuracy >= target_accuracy]
    if not feasible:
        best = max((p.accuracy for p in candidates), default=float("nan"))
        return Calibration(
            target, None, f"accuracy {target_accuracy:.4f} is not reached on validation by any policy (best {best:.4f})"
        )
    cheapest = min(feasible, key=lambda p: (p.mean_gflops, -p.accuracy))
    return Calibration(target, cheapest)


def calibrate(
    val_logits: Logits,
    val_labels: np.ndarray,
    stage_gflops: Sequence[float],
    budgets_gflops: Sequence[float] = (),
    target_accuracies: Sequence[float] = (),
    eval_splits: dict[str, tuple[Logits, np.ndarray]] | None = None,
) -> list[Calibration]:
    """Pick thresholds on validation for each budget and accuracy target.

    ``eval_splits`` maps a split name to (logits, labels): the chosen thresholds are then
    also scored there (e.g. on test), which reports but never influences the choice.
    """
    candidates = candidate_policies(confidences(val_logits), val_labels, stage_gflops)
    results = [calibrate_for_budget(candidates, b) for b in budgets_gflops]
    results += [calibrate_for_accuracy(candidates, a) for a in target_accuracies]
    scored = {name: (confidences(logits), labels) for name, (logits, labels) in (eval_splits or {}).items()}
    for cal in results:
        if cal.chosen is None:
            continue
        for name, (logits, labels) in scored.items():
            p = score(logits, labels, cal.chosen.thresholds, stage_gflops)
            cal.evaluated[name] = {
                "accuracy": p.accuracy,
                "mean_gflops": p.mean_gflops,
                "exit_fractions": p.exit_fractions,
            }
    return results
