"""sft (the labels' cross-entropy alone), and kd, uld, mined and overlap_kd: the teacher's distribution compared with
the student's in the student's space, at one teacher position per student position (the same position, the i-th
response position, or an exactly aligned one).

- mined: the teacher's probabilities summed into student ids through a minimum-edit-distance token map, against
  the student's whole distribution.
- overlap_kd: both distributions restricted to the shared sub-vocabulary (teacher tokens whose text is a student
  token's, through the cache's exact vocabulary map) and renormalised there, so neither side is asked to put mass
  on tokens the other cannot name: the simple cross-tokenizer default of the DSKD authors' newer toolkit (KDFlow).
Both carry the teacher's mass with `_carry`; kd needs one tokenizer, uld none."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.cache.batch import Batch
from pipeline.losses import (
    LOG_FLOOR,
    SparseLogits,
    cross_entropy_sum,
    divergence_from_log_probs,
    floored,
    sorted_l1,
)
from pipeline.objectives import liger
from pipeline.objectives.base import ObjectiveBase, ObjectiveOutput, StudentSide, teacher_target
from pipeline.objectives.chunks import chunked


def sft(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float) -> ObjectiveOutput:
    """CE on the labels: the whole loss (alpha weighs CE against a KD term, and sft has none)."""
    if liger.serves(ob, student.head, student.hidden.device):
        ce = liger.ce_sum(student.hidden, student.head, labels) / normaliser
        return ObjectiveOutput(ce, {"ce": ce}, {})
    out = chunked(lambda head, h, y: {"ce": cross_entropy_sum(head(h), y)}, len(labels), ob.chunk, student.hidden,
                  labels, head=student.head, head_on_first=True)
    ce = out["ce"] / normaliser
    return ObjectiveOutput(ce, {"ce": ce}, {})


def kd(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float) -> ObjectiveOutput:
    """One tokenizer: teacher position i is student position i; heads of one family padded to different sizes share
    the first min(V) ids."""
    n, t = len(labels), ob.teacher
    if batch.teacher_hidden.shape[0] != n:
        raise ValueError(f"kd: {batch.teacher_hidden.shape[0]} cached teacher positions for {n} student "
                         f"labels in rows {batch.ids[:4]}... (a cross-tokenizer cache?)")
    if liger.serves(ob, student.head, student.hidden.device):
        return liger.kd(ob, batch, student, labels, normaliser)
    rows = torch.arange(n, device=labels.device)

    def per_position(z_s, target, log_q):
        v = min(z_s.shape[-1], t.head.vocab_size)
        if v < z_s.shape[-1]:  # the student's log-softmax is over the shared ids only
            return ob.div(z_s[:, :v], target[:, :v] if t.dense else _truncate(target, v))
        return ob.div(z_s, target[:, :v] if t.dense else _truncate(target, v), student_log_probs=log_q)

    return student_space_kd(ob, batch, student, labels, normaliser, rows, rows, per_position)


def uld(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float) -> ObjectiveOutput:
    """The i-th response position of each side, up to the shorter response; sorted-probability L1."""
    s_rows, t_rows = _first_positions(labels, batch)
    return student_space_kd(ob, batch, student, labels, normaliser, s_rows, t_rows,
                            lambda z_s, target, _: sorted_l1(z_s, target, temperature=ob.cfg.temperature))


def mined(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float) -> ObjectiveOutput:
    """The exactly aligned positions; the teacher carried into the student vocabulary by the MinED map."""
    m = ob.teacher.mined_map
    keep_t = m >= 0
    t_ids, into = torch.nonzero(keep_t)[:, 0], m[keep_t]

    def per_position(z_s, target, log_q):
        return _student_div(ob, _carry(ob, target, t_ids, into, z_s.shape[-1]), z_s, log_q)

    return student_space_kd(ob, batch, student, labels, normaliser, batch.align_student, batch.align_teacher,
                            per_position)


def overlap_kd(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor,
               normaliser: float) -> ObjectiveOutput:
    """The exactly aligned positions; both distributions on the shared sub-vocabulary, renormalised there."""
    t_ids, s_ids, s_index = _overlap(ob.teacher.vocab_map)

    def per_position(z_s, target, _):
        return _student_div(ob, _carry(ob, target, t_ids, s_index, len(s_ids)), z_s[:, s_ids])

    return student_space_kd(ob, batch, student, labels, normaliser, batch.align_student, batch.align_teacher,
                            per_position)


def student_space_kd(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float,
                     s_rows: torch.Tensor, t_rows: torch.Tensor, per_position) -> ObjectiveOutput:
    """CE plus the KD term `per_position(student logits, teacher target, their log-softmax or None)` summed over the
    student positions `s_rows` paired with the teacher positions `t_rows`, each divided by N-bar. The log-softmax is
    the CE's, given at temperature 1 (`shared_log_softmax`) for a divergence over the student's whole vocabulary."""
    t, n = ob.teacher, len(labels)
    pair = torch.full((n,), -1, dtype=torch.long, device=labels.device)
    pair[s_rows] = t_rows
    has = pair >= 0
    t_idx = pair.clamp(min=0)
    hidden_t = batch.teacher_hidden[t_idx] if t.dense else None
    sparse = ob.sparse(batch, t_idx)

    def fn(head, h, y, ht, sp, keep):
        z_s = head(h)
        log_q = ob.shared_log_softmax(z_s)
        target, err = teacher_target(t, ht, sp)
        return {"ce": cross_entropy_sum(z_s, y, log_q), "kd": (per_position(z_s, target, log_q) * keep).sum(),
                "max_err": err}

    out = chunked(fn, n, ob.chunk, student.hidden, labels, hidden_t, sparse, has.float(), head=student.head,
                  hints={"ce": ob.ce_hint(normaliser), "kd": ob.kd_alpha / normaliser}, head_on_first=True)
    ob.check(out["max_err"], batch)
    return ob.done(out["ce"] / normaliser, {"kd": out["kd"] / normaliser},
                   {"teacher_max_err": float(out["max_err"]), "kd_positions": float(has.sum())})


def _carry(ob: ObjectiveBase, target, t_ids: torch.Tensor, into: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size) floored log-probabilities: the teacher's probabilities of ids `t_ids` (at the loss temperature)
    summed into entries `into` of a support of `size`, renormalised over it."""
    c = ob.cfg
    log_p_t = target.dense_log_probs(c.temperature) if isinstance(target, SparseLogits) else \
        F.log_softmax(target.float() / c.temperature, -1)
    mass = log_p_t.new_zeros(log_p_t.shape[0], size).index_add_(-1, into, log_p_t[:, t_ids].exp())
    return torch.log(mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)).clamp(min=LOG_FLOOR)


def _student_div(ob: ObjectiveBase, log_p: torch.Tensor, z_s: torch.Tensor,
                 log_softmax_s: torch.Tensor | None = None) -> torch.Tensor:
    """D(carried teacher || student) per position, the student's logits z_s over the same support as log_p
    (`log_softmax_s`: their log-softmax at the temperature, when taken already)."""
    c = ob.cfg
    if log_softmax_s is None:
        log_softmax_s = F.log_softmax(z_s.float() / c.temperature, -1)
    log_q = floored(log_softmax_s)
    return divergence_from_log_probs(c.divergence, log_p, log_q, skew=c.skew, akl_mu=c.akl_mu, beta=c.beta)


def _overlap(vocab_map: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(teacher ids with a same-text student token, the distinct student ids they map to (sorted), and for each
    teacher id the index of its student id in that list)."""
    if vocab_map is None:
        raise ValueError("overlap_kd needs the cache's vocabulary map (a cross-tokenizer cache)")
    t_ids = torch.nonzero(vocab_map >= 0)[:, 0]
    s_ids, s_index = torch.unique(vocab_map[t_ids], return_inverse=True)
    return t_ids, s_ids, s_index


def _truncate(sparse: SparseLogits, v: int) -> SparseLogits:
    if v >= sparse.vocab_size:
        return sparse
    if bool((sparse.ids >= v).any()):
        raise ValueError(f"a cached top-k id lies beyond the student's vocabulary of {v}; use a dense teacher")
    return SparseLogits(sparse.ids, sparse.logits, sparse.lse, v)


def _first_positions(labels: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """ULD's pairing: the i-th response label position of the student with the teacher's i-th, per example."""
    s_row = torch.nonzero(batch.labels != -100)[:, 0]
    s_out, t_out = [], []
    for b in range(len(batch.ids)):
        i = torch.nonzero(s_row == b)[:, 0]
        j = torch.nonzero(batch.teacher_row == b)[:, 0]
        m = min(len(i), len(j))
        s_out.append(i[:m])
        t_out.append(j[:m])
    return torch.cat(s_out), torch.cat(t_out)
