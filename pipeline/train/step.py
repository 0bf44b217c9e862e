"""One micro-batch's loss and what is logged beside it: the on-policy mix (reference section 8: L = (1 - alpha)
CE(gold) / N-bar + alpha KD(rollout) / N-bar_kd) and the per-term gradient diagnostics."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.cache.batch import Batch
from pipeline.objectives.base import ObjectiveOutput, StudentSide, detached_side, term_grad_norms
from pipeline.objectives.objective import Objective
from pipeline.objectives.setup import student_side


def on_policy(seed: int, k: int, mix: float) -> bool:
    """Whether global micro-batch k takes its KD term from the student's samples (seeded, about `mix` of them)."""
    return mix > 0 and np.random.default_rng([seed, k]).random() < mix


def mixed(engine, compute: Objective, ce_only: Objective, alpha: float, batch: Batch, hidden: torch.Tensor,
           kd_batch: Batch | None, normaliser: float, kd_normaliser: float, device) -> ObjectiveOutput:
    """CE on the gold micro-batch (normalised by the gold label count) + KD on `kd_batch` when given (a second
    student forward), else on the gold batch (normalised by the count of labels that KD terms were computed on)."""
    student = engine.module.student
    if kd_batch is None:
        # CE is a sum over labels / the normaliser: the gold one's normaliser, not the KD one's
        out = compute(batch, student_side(student, batch, hidden), kd_normaliser, ce_weight=kd_normaliser / normaliser)
        loss, ce = out.loss, out.terms["ce"] * (kd_normaliser / normaliser)
    else:
        ce = ce_only(batch, student_side(student, batch, hidden), normaliser).terms["ce"]
        kd_batch = kd_batch.to(device)
        kd_hidden = engine(kd_batch.input_ids, kd_batch.attention_mask)
        out = compute(kd_batch, student_side(student, kd_batch, kd_hidden), kd_normaliser, ce_weight=0.0)
        loss = (1 - alpha) * ce + out.loss  # out.loss: alpha * KD alone
    kd_terms = {k: v for k, v in out.terms.items() if k != "ce"}
    return ObjectiveOutput(loss, {"ce": ce, **kd_terms}, {**out.stats, "onpolicy_fraction": float(kd_batch is not None)})


def diagnostics(compute: Objective, batch: Batch, side: StudentSide, normaliser, projectors,
                 alpha: float) -> dict[str, float]:
    """What a distillation run logs beside its terms: each term's gradient norm on the student's hidden states at
    the label positions, on its head and on t2s, and the projectors' norms. The objective runs once more on detached
    copies of the student's side (no backward through the body, none through the engine), at logged steps only."""
    leaf = detached_side(side)
    out = compute(batch, leaf, normaliser)
    wrt = {"hidden": leaf.hidden, "head": leaf.head.weight}
    if projectors is not None and hasattr(projectors, "t2s"):
        wrt["t2s"] = projectors.t2s.weight
    norms = term_grad_norms(out, alpha, {k: v for k, v in wrt.items() if v.requires_grad})  # LoRA: a frozen head
    for name in ("t2s", "s2t"):
        if projectors is not None and hasattr(projectors, name):
            norms[f"{name}_norm"] = float(getattr(projectors, name).weight.detach().norm())
    return norms
