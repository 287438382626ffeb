"""Training objectives for multi-exit networks: EED and the methods the paper compares.

All reductions follow the authors' reference code (DESIGN §1) so that alpha = beta = 1
means what the paper means:

* CE: averaged over the batch, summed over outputs;
* KL: ``kl_div(log_softmax(Z_i/T), softmax(teacher/T), reduction="batchmean") * T**2``;
* MSE: averaged over all elements (batch x classes, or batch x feature dimension).

Teacher signals are always detached: the ensemble (or the main output) teaches, but no
gradient flows into it through the distillation terms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("baseline", "branchynet", "kd", "byot", "eed")
DISTILL_KINDS = ("kl", "mse")
# α when none is given: the weights the paper's authors ran. Their code multiplies the whole KL
# term by 0.1 (DESIGN §1), so the paper's "α = 1 (KL)" is 0.1 in L; MSE has no such factor.
# An α given explicitly is taken literally.
DEFAULT_ALPHA = {"kl": 0.1, "mse": 1.0}


def default_alpha(distill: str) -> float:
    """The authors' α for a distillation kind (DEFAULT_ALPHA)."""
    if distill not in DEFAULT_ALPHA:
        raise ValueError(f"unknown distillation kind {distill!r}; choose one of {DISTILL_KINDS}")
    return DEFAULT_ALPHA[distill]


def logit_distillation(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """l_z(student, teacher): Hinton KL at temperature T (times T²) or logit MSE."""
    if kind == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean") * (
            t * t
        )
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"unknown distillation kind {kind!r}; choose one of {DISTILL_KINDS}")


def _resolve_teacher(num_exits: int, teacher_exits: Sequence[int] | None) -> list[int]:
    """0-based indices of the outputs forming the ensemble teacher (default: all of them)."""
    if teacher_exits is None or len(teacher_exits) == 0:
        return list(range(num_exits))
    bad = [e for e in teacher_exits if not 1 <= e <= num_exits]
    if bad:
        raise ValueError(f"teacher exits {bad} do not exist; this model has exits 1..{num_exits}")
    return sorted({e - 1 for e in teacher_exits})


def multi_exit_loss(
    logits: Sequence[torch.Tensor],
    features: Sequence[torch.Tensor] | None,
    target: torch.Tensor,
    method: str = "eed",
    distill: str = "kl",
    alpha: float | None = None,
    beta: float = 1.0,
    temperature: float = 3.0,
    teacher_exits: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The loss of one batch for a multi-exit network.

    Args:
        logits: Z_1..Z_k in exit order (the last is the main output).
        features: F_1..F_k (pooled features before each linear layer); needed by byot/eed
            when ``beta != 0``.
        target: class indices.
        method: ``baseline`` (CE on the main output), ``branchynet`` (CE at every output),
            ``kd`` (+ alpha·l_z from the main output), ``byot`` (+ beta·l_f from the main
            output's features) or ``eed`` (every output distils from the exit ensemble).
        alpha: weight of the logit-distillation term; None = the authors' for ``distill``
            (0.1 with KL, 1 with MSE: DEFAULT_ALPHA).
        teacher_exits: 1-based exits forming the EED ensemble teacher (paper Table IV);
            default all.

    Returns:
        ``{"loss": total, "ce": Σ CE, "logit_distill": Σ l_z, "feature_distill": Σ l_f,
        "ce_exit1": ..., ...}``; components are weighted as they enter the total except the
        per-exit CE entries, which are for logging.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if alpha is None:
        alpha = default_alpha(distill)
    # In float32 whatever the network's outputs are: CPU autocast leaves softmax/log_softmax (and
    # the teachers' means) in bfloat16 for bfloat16 logits — 13 % off in the KL term's gradient
    # near convergence, by a review script — where CUDA autocast would have moved them to float32.
    logits = [z.float() for z in logits]
    features = None if features is None else [f.float() for f in features]
    k = len(logits)
    zero = logits[-1].new_zeros(())
    ce_terms = [F.cross_entropy(z, target) for z in logits]
    if method == "baseline":
        ce = ce_terms[-1]
    else:
        ce = torch.stack(ce_terms).sum()

    logit_term, feature_term = zero, zero
    if method in ("kd", "byot", "eed") and k > 1:
        if method == "eed":
            teacher = _resolve_teacher(k, teacher_exits)
            students = range(k)
            g_z = torch.stack([logits[i] for i in teacher]).mean(0).detach()
            z_teachers = [g_z] * k
        else:  # kd / byot: the main output teaches exits 1..k-1
            students = range(k - 1)
            z_teachers = [logits[-1].detach()] * (k - 1)
        if alpha:
            logit_term = (
                alpha
                * torch.stack(
                    [logit_distillation(logits[i], t, distill, temperature) for i, t in zip(students, z_teachers)]
                ).sum()
            )
        if beta and method in ("byot", "eed"):
            if features is None:
                raise ValueError(f"method {method!r} with beta != 0 needs the per-exit features")
            if method == "eed":
                g_f = torch.stack([features[i] for i in teacher]).mean(0).detach()
            else:
                g_f = features[-1].detach()
            feature_term = beta * torch.stack([F.mse_loss(features[i], g_f) for i in students]).sum()

    out = {
        "loss": ce + logit_term + feature_term,
        "ce": ce,
        "logit_distill": logit_term,
        "feature_distill": feature_term,
    }
    for i, term in enumerate(ce_terms, start=1):
        out[f"ce_exit{i}"] = term.detach()
    return out


class MultiExitLoss(nn.Module):
    """``multi_exit_loss`` as a module whose weights are constructor arguments.

    >>> criterion = MultiExitLoss(method="eed", distill="kl", beta=1.0, temperature=3.0)  # α: the authors' 0.1
    >>> parts = criterion(model(images), labels); parts["loss"].backward()
    """

    def __init__(
        self,
        method: str = "eed",
        distill: str = "kl",
        alpha: float | None = None,
        beta: float = 1.0,
        temperature: float = 3.0,
        teacher_exits: Sequence[int] | None = None,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        if distill not in DISTILL_KINDS:
            raise ValueError(f"unknown distillation kind {distill!r}; choose one of {DISTILL_KINDS}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.method, self.distill = method, distill
        self.alpha = default_alpha(distill) if alpha is None else alpha
        self.beta, self.temperature = beta, temperature
        self.teacher_exits = list(teacher_exits) if teacher_exits else None

    def forward(self, output, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``output`` is a MultiExitOutput (or anything with ``.logits`` and ``.features``)."""
        return multi_exit_loss(
            output.logits,
            output.features,
            target,
            method=self.method,
            distill=self.distill,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
            teacher_exits=self.teacher_exits,
        )

    def extra_repr(self) -> str:
        return (
            f"method={self.method}, distill={self.distill}, alpha={self.alpha}, beta={self.beta}, "
            f"T={self.temperature}, teacher_exits={self.teacher_exits or 'all'}"
        )
