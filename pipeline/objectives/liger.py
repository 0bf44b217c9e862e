"""On CUDA, Liger-Kernel's fused linear kernels (the GPU anchor: Triton kernels that take each chunk's gradient in the
forward pass and never hold the logits) where they compute what the built-in path computes: sft's cross-entropy
(fused linear cross-entropy) and kd with fkl / rkl / js / gjsd (fused linear generalised JSD at beta 0 / 1 / 0.5 /
`loss.beta`: Liger's JSD(P || Q) with P the teacher, the convention of losses.py). An optional extra
(`make install-liger`); the built-in fused chunks (chunks.py) serve everything else, and everywhere off CUDA.

Served only when the kernels' inputs are this project's: `loss.kernels: auto`, a CUDA student, the package
importable, a bias-free linear student head that is whole (not partitioned by ZeRO-3; a LoRA adapter on it is not a
plain linear) and, for kd, a dense teacher whose head is a plain linear too (no bias, logit scale or soft-cap).
The dense teacher's recomputation check then covers the cached top-k logits (k * d per position), not the
log-sum-exp, which would need the vocabulary-sized logits the kernel avoids.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from pipeline.cache.batch import Batch
from pipeline.objectives.base import ObjectiveBase, ObjectiveOutput, StudentSide, max_abs

# losses.py's divergence -> Liger's jsd_beta (gjsd: loss.beta)
BETA = {"fkl": 0.0, "rkl": 1.0, "js": 0.5}


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def plain(head) -> bool:
    """A linear layer without bias whose weight is whole: what the kernels take."""
    return isinstance(head, nn.Linear) and head.bias is None and not hasattr(head.weight, "ds_id")


def serves(ob: ObjectiveBase, head: nn.Module, device: torch.device) -> bool:
    """Whether this objective's vocabulary-sized work goes to Liger for a student head on `device`."""
    c, name = ob.cfg, ob.spec.name
    if c.kernels != "auto" or device.type != "cuda" or name not in ("sft", "kd") or not plain(head) or not installed():
        return False
    if name == "sft":
        return True
    t = ob.teacher
    return (t.dense and (c.divergence in BETA or c.divergence == "gjsd") and t.head.bias is None
            and t.head.logit_scale is None and t.head.final_logit_softcapping is None)


def ce_sum(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the labels' cross-entropies (-100 ignored), float32."""
    from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction

    out = LigerFusedLinearCrossEntropyFunction.apply(hidden, head.weight, labels, None, None, -100, 0.0, 0.0, "sum")
    return (out[0] if isinstance(out, tuple) else out).float()


def kd(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float) -> ObjectiveOutput:
    """kd's (1 - alpha) CE + alpha KD with both terms from Liger (the teacher position i is student position i, the
    heads truncated to their shared first ids as in `student_space.kd`)."""
    from liger_kernel.ops import LigerFusedLinearJSDFunction

    c, t = ob.cfg, ob.teacher
    head = student.head
    v = min(head.weight.shape[0], t.head.vocab_size)
    w_t = t.head.weight[:v]
    hidden_t = batch.teacher_hidden.to(w_t.dtype)
    n = len(labels)
    ce = ce_sum(student.hidden, head, labels)
    # Liger divides by the count of positions not ignored: every position here, so times n is the sum
    mean = LigerFusedLinearJSDFunction.apply(student.hidden, head.weight[:v], hidden_t, w_t, None,
                                            BETA.get(c.divergence, c.beta), -100, c.temperature)
    with torch.no_grad():
        err = max_abs(t.head.logits_at(batch.teacher_hidden, batch.teacher_topk_ids) - batch.teacher_topk_logits)
    ob.check(err, batch)
    return ob.done(ce / normaliser, {"kd": mean.float() * n / normaliser},
                   {"teacher_max_err": float(err), "kd_positions": float(n)})
