"""What every objective shares: the student's and teacher's sides, the output, the teacher's logits recomputed from
the cache (and checked), and `ObjectiveBase`, the configured objective's shared pieces (divergence, sparse teacher,
the (1 - alpha) * CE + alpha * KD mix, the recomputation check). Each family of objectives is a function of an
`ObjectiveBase` in its own module; vocabulary-sized work goes through `chunks.chunked`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cache.batch import Batch
from pipeline.config import LossConfig
from pipeline.losses import SparseLogits, auto_chunk_positions, divergence, log_softmax
from pipeline.models.head import OutputHead
from pipeline.models.zero3 import detached_full
from pipeline.objectives.projectors import Projectors
from pipeline.objectives.table import spec


@dataclass
class RowTerm:
    """A term of the student's label log-probabilities summed over groups of label rows (alm's chunks), taken inside
    the chunks of rows: `fn(logp, group)` for a span's rows, spans never splitting a group."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logp (n,), group (n,) long) -> scalar
    group: torch.Tensor  # (N,) long: each label row's group, -1 for none
    hint: float  # its weight in the loss (chunks.chunked's hints)


class TeacherMismatch(RuntimeError):
    """Recomputed teacher logits disagree with the cached top-k: wrong head, or a lossy hidden-state encoding."""


@dataclass
class StudentSide:
    """What the objective needs from the student for one micro-batch."""

    hidden: torch.Tensor  # (N, d_S) last hidden state (after the final norm) at the label positions, row-major
    head: nn.Module  # the output layer, trained
    embeddings: nn.Module | None = None  # the input embedding layer (dskd_cma reads its weight, detached)


@dataclass
class TeacherSide:
    """The teacher's frozen pieces, once per run."""

    head: OutputHead
    dense: bool = True  # logits = cached hidden x head; False: top-k + tail from the cache
    check_tol: float = 1e-2  # derived from how the cache was stored (cache/schema.recompute_tolerance)
    check_source: str = "the cache"  # named when the check fails
    embeddings: torch.Tensor | None = None  # (V_T, d_T), dskd_cma
    mined_map: torch.Tensor | None = None  # (V_T,) long teacher id -> student id (mined)
    vocab_map: torch.Tensor | None = None  # (V_T,) long teacher id -> student id with the same text, -1 (overlap_kd)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar: (1 - alpha) * ce + alpha * kd
    terms: dict[str, torch.Tensor]  # each term, normalised as it enters the loss (differentiable)
    stats: dict[str, float] = field(default_factory=dict)  # logged only (agreement, teacher_max_err, ...)


def linear_sg(h: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """h @ sg(W)^T (+ sg(b)): the student head applied without training it (projected-teacher logits)."""
    bias = getattr(head, "bias", None)
    w, b = detached_full(head.weight), None if bias is None else detached_full(bias)
    return F.linear(h.to(w.dtype), w, b)


def teacher_target(teacher: TeacherSide, hidden: torch.Tensor | None, sparse: SparseLogits) -> tuple:
    """(target, max error): dense logits recomputed from hidden states (checked against the cached top-k), or the
    sparse top-k + tail itself."""
    if not teacher.dense:
        return sparse, sparse.lse.new_zeros(())
    with torch.no_grad():
        z = teacher.head.logits(hidden)
        err = torch.maximum(max_abs(z.gather(-1, sparse.ids.long()) - sparse.logits),
                            max_abs(torch.logsumexp(z, -1) - sparse.lse))
    return z, err


class LeafHead(nn.Module):
    """The student's head over leaf tensors that share its weights' storage: a term's gradient on the head, taken
    here, stops at the head (a head tied to the input embeddings would otherwise send it through the body, and through
    DeepSpeed's hooks on the engine's output)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.weight = head.weight.detach().requires_grad_(head.weight.requires_grad)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
        self.out_features = self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def detached_side(side: StudentSide) -> StudentSide:
    """The student's side over new leaf tensors sharing its storage: gradients taken on it stop there."""
    return StudentSide(side.hidden.detach().requires_grad_(), LeafHead(side.head), side.embeddings)


def term_grad_norms(out: ObjectiveOutput, alpha: float, wrt: dict[str, torch.Tensor]) -> dict[str, float]:
    """`grad_<term>_<name>`: the norm of the gradient of each term, weighted as it enters the loss ((1 - alpha) for
    ce, alpha for the KD terms), with respect to each tensor of `wrt` (the student's hidden states at the label
    positions, its head, a projector), without touching .grad (the graph is kept for the real backward). Which term
    moves what, and against what: the diagnosis of a method that does not beat its baseline."""
    norms: dict[str, float] = {}
    parts = set(out.terms) - {"ce", "kd"}
    for k, v in out.terms.items():
        if (k == "kd" and parts) or not v.requires_grad:  # kd is then the sum of the terms logged one by one
            continue
        grads = torch.autograd.grad(((1 - alpha) if k == "ce" else alpha) * v, list(wrt.values()), retain_graph=True,
                                    allow_unused=True)
        for name, g in zip(wrt, grads):
            norms[f"grad_{k}_{name}"] = 0.0 if g is None else float(g.norm())
    return norms


def apply_projector(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A projector on x in the projector's dtype (bf16 under mixed precision), result in float32."""
    return module(x.to(module.weight.dtype)).float()


def max_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().max() if x.numel() else x.new_zeros(())


# --------------------------------------------------------------------------------------------------------------
# The configured objective's shared pieces


class ObjectiveBase:
    """One objective's configuration and teacher, and the pieces every family uses."""

    def __init__(self, cfg: LossConfig, teacher: TeacherSide | None, projectors: Projectors | None, chunk_positions: int):
        self.cfg, self.teacher, self.proj, self.chunk = cfg, teacher, projectors, chunk_positions
        self.fixed_chunk = chunk_positions  # 0: each term's chunks from its own vocabulary (`chunk_for`)
        self.spec = spec(cfg.objective)  # its entry in table.py
        self.ce_weight = 1.0  # the CE term's weight in `loss` relative to (1 - alpha): set per call
        self.kd_weight = 1.0  # the KD term's weight relative to alpha: a teacher's weight among several (`Ensemble`)
        # dskd_v2 / dskd_eta: whether the last micro-batch trusted the projected teacher only where it agreed (None:
        # no micro-batch yet), the guess this one's fused chunks are hinted with (chunks.chunked: a wrong guess
        # costs a recomputation, not a wrong gradient; no guess, one more backward per chunk)
        self.masked_guess: bool | None = None
        self.agreement_guess = 1.0  # the last micro-batch's agreeing fraction of its t2s rows

    def chunk_for(self, vocab_size: int) -> int:
        """Positions per chunk of a term whose chunks hold logits over `vocab_size` alone (the teacher space's,
        over the teacher's vocabulary): the configured size, else the automatic one for that vocabulary. `chunk`
        is the one for the largest vocabulary in play: at 262k -> 49k, the teacher space's 237 positions were cut
        into four chunks of 64, each product at 180 GFLOP/s against 230 for one of 237 (2 cores)."""
        return self.fixed_chunk or auto_chunk_positions(vocab_size)

    def div(self, student_logits, target, name: str | None = None, *, student_log_probs=None,
            teacher_log_probs=None) -> torch.Tensor:
        """Per-position D(target || student) with the configured divergence (or `name`) and its parameters;
        `student_log_probs` / `teacher_log_probs`: either side's log-softmax at the temperature, when the caller
        took it already (`shared_log_softmax`)."""
        c = self.cfg
        return divergence(name or c.divergence, student_logits, target, temperature=c.temperature, skew=c.skew,
                          akl_mu=c.akl_mu, beta=c.beta, reduction="none", student_log_probs=student_log_probs,
                          teacher_log_probs=teacher_log_probs)

    def shared_log_softmax(self, logits: torch.Tensor) -> torch.Tensor | None:
        """log_softmax(logits) in float32 when a cross-entropy term and the divergence can share it (the loss
        temperature is 1); else None, and each takes its own."""
        return log_softmax(logits) if self.cfg.temperature == 1.0 else None

    def sparse(self, batch: Batch, rows: torch.Tensor | None = None) -> SparseLogits:
        s = SparseLogits(batch.teacher_topk_ids, batch.teacher_topk_logits, batch.teacher_lse, self.teacher.head.vocab_size)
        return s if rows is None else s[rows]

    @property
    def kd_alpha(self) -> float:
        """The KD term's weight in the loss: alpha, times this teacher's weight among several."""
        return self.cfg.alpha * self.kd_weight

    def ce_hint(self, normaliser: float) -> float:
        """CE's weight in the loss: (1 - alpha) * ce_weight / N-bar."""
        return (1 - self.cfg.alpha) * self.ce_weight / normaliser

    def done(self, ce: torch.Tensor, kd: dict[str, torch.Tensor], stats: dict) -> ObjectiveOutput:
        total_kd = sum(kd.values())
        loss = (1 - self.cfg.alpha) * self.ce_weight * ce + self.kd_alpha * total_kd
        terms = {"ce": ce, "kd": total_kd, **kd}
        return ObjectiveOutput(loss, terms, stats)

    def check(self, err: torch.Tensor, batch: Batch) -> None:
        e = float(err)
        if not e <= self.teacher.check_tol:  # also catches NaN
            raise TeacherMismatch(
                f"teacher logits recomputed from cached hidden states x head differ from the cached top-k by {e:.3g} "
                f"in rows {batch.ids[:4]}..., more than the {self.teacher.check_tol:.3g} allowed for "
                f"{self.teacher.check_source}: the rows' hidden states, top-k or head do not belong together "
                "(check with `dskd cache verify`; loss.teacher_logits: sparse trains from the top-k alone)"
            )
