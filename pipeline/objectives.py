"""Objectives: compose a Batch, the student logits and the teacher's recomputed logits with the losses.

Each objective returns the micro-batch loss already divided by the global token normaliser (losses.token_normaliser)
and the raw per-term sums for logging. Implemented here: `sft` (cross-entropy only) and `kd` (vanilla white-box KD,
reference section 2: (1 - alpha) * CE + alpha * D(teacher, student)). The DSKD family arrives with the Objectives issue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.batch import Batch
from pipeline.config import LossConfig
from pipeline.head import OutputHead
from pipeline.losses import cross_entropy_sum, divergence

NEEDS_TEACHER = {"sft": False, "kd": True}


class TeacherMismatch(RuntimeError):
    """Recomputed teacher logits disagree with the cached top-k: wrong head, or a lossy hidden-state encoding."""


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar: sum of weighted terms / normaliser
    sums: dict[str, float]  # un-normalised sum over tokens of each term


def teacher_logits(batch: Batch, head: OutputHead, tol: float) -> tuple[torch.Tensor, float]:
    """Teacher logits (N, V_T) recomputed from cached hidden states, and their max error against the cached
    top-k logits and log-sum-exp. Raises TeacherMismatch above `tol`."""
    z = head.logits(batch.teacher_hidden)
    err_topk = (z.gather(-1, batch.teacher_topk_ids.long()) - batch.teacher_topk_logits).abs().max()
    err_lse = (torch.logsumexp(z, dim=-1) - batch.teacher_lse).abs().max()
    err = max(err_topk.item(), err_lse.item())
    if not err <= tol:  # also catches NaN
        raise TeacherMismatch(
            f"teacher logits recomputed from the cache differ from the cached top-k by {err:.3g} (> {tol:g}) "
            f"in rows {batch.ids[:4]}...; the head does not reproduce the teacher"
        )
    return z, err


def compute_objective(
    cfg: LossConfig,
    batch: Batch,
    student_logits: torch.Tensor,
    normaliser: float,
    teacher: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """student_logits (B, L, V_S); teacher (N, V_T) at the N label positions of the batch (kd only)."""
    ce = cross_entropy_sum(student_logits, batch.labels)
    if cfg.objective == "sft":
        return ObjectiveOutput(ce / normaliser, {"ce": ce.item()})
    if cfg.objective == "kd":
        s = student_logits[batch.labels != -100]  # (N, V_S), row-major like the cached teacher rows
        if teacher is None or teacher.shape[0] != s.shape[0]:
            raise ValueError(
                f"kd needs teacher logits for each of the {s.shape[0]} label positions, got "
                f"{None if teacher is None else teacher.shape[0]} (rows {batch.ids[:4]}...)"
            )
        # padded heads of one family (Qwen 151,936 vs 152,064) share the first min(V) ids
        v = min(s.shape[-1], teacher.shape[-1])
        kd = divergence(cfg.divergence, s[:, :v], teacher[:, :v], temperature=cfg.temperature, reduction="sum")
        loss = ((1 - cfg.alpha) * ce + cfg.alpha * kd) / normaliser
        return ObjectiveOutput(loss, {"ce": ce.item(), "kd": kd.item()})
    raise ValueError(f"unknown objective {cfg.objective!r}")
