"""Divergences as pure tensor functions, cross-entropy, and the global-batch token normaliser.

Conventions (reference section 2, this project's decisions in section 15):
- p = softmax(teacher / T) is the target, q = softmax(student / T) the learner; fkl = KL(p || q), rkl = KL(q || p).
- Everything is computed in float32 whatever the input dtype; there is no T^2 factor.
- Terms where the weighting probability is 0 contribute exactly 0, so -inf logits (masked vocabulary entries) and
  underflowing probabilities never produce NaN.
The remaining divergences (js, skl, srkl, tvd, akl) and sparse top-k teachers arrive with the Objectives issue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# log-probabilities below this are probabilities of exactly 0 in float32; clamping keeps every term and its
# gradient finite (0 * finite) where a -inf logit would otherwise give 0 * inf = NaN, even through torch.where
_LOG_FLOOR = -1e4


def _xlogy_diff(w: torch.Tensor, log_w: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:
    """sum_v w * (log_w - log_other); terms with w == 0 are exactly 0, in value and gradient."""
    return (w * (log_w.clamp(min=_LOG_FLOOR) - log_other.clamp(min=_LOG_FLOOR))).sum(-1)


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-position divergence between teacher and student distributions.

    student_logits, teacher_logits: (..., V). mask: (...) bool, positions to keep (None = all).
    reduction: "none" -> (...) per-position values (0 where masked); "sum" -> scalar sum over kept positions;
    "mean" -> scalar mean over kept positions.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if name == "fkl":
        per_pos = _xlogy_diff(log_p.exp(), log_p, log_q)
    elif name == "rkl":
        per_pos = _xlogy_diff(log_q.exp(), log_q, log_p)
    else:
        raise ValueError(f"unknown divergence {name!r} (available: fkl, rkl)")
    if mask is not None:
        per_pos = torch.where(mask, per_pos, torch.zeros_like(per_pos))
    if reduction == "none":
        return per_pos
    if reduction == "sum":
        return per_pos.sum()
    if reduction == "mean":
        count = per_pos.numel() if mask is None else mask.sum()
        return per_pos.sum() / max(int(count), 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies in float32; labels -100 are ignored. logits (..., V), labels (...)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


def token_normaliser(global_tokens: int, grad_accum: int, world_size: int) -> float:
    """N-bar of reference section 1.4: the mean number of loss tokens per micro-batch over the global batch.

    Each micro-batch loss is (sum over its tokens) / N-bar. The engine averages gradients over grad_accum x world,
    so the optimizer sees an exact token mean over the global batch, whatever the accumulation and world size.
    """
    return max(global_tokens, 1) / (grad_accum * world_size)
