"""kd, uld, mined and overlap_kd: the teacher's distribution compared with the student's in the student's space, at
one teacher position per student position (the same position, the i-th response position, or an exactly aligned one).

- mined: the teacher's probabilities summed into student ids through a minimum-edit-distance token map, against
  the student's whole distribution.
- overlap_kd: both distributions restricted to the shared sub-vocabulary (teacher tokens whose text is a student
  token's, through the cache's exact vocabulary map) and renormalised there, so neither side is asked to put mass
  on tokens the other cannot name: the simple cross-tokenizer default of the DSKD authors' newer toolkit (KDFlow).
Both carry the teacher's mass with `_carry`; kd needs one tokenizer, uld none."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.batch import Batch
from pipeline.losses import LOG_FLOOR, SparseLogits, cross_entropy_sum, divergence_from_log_probs, sorted_l1
from pipeline.objectives.base import ObjectiveBase, StudentSide, chunked, teacher_target


def student_space_kd(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float):
    """kd / uld / mined / overlap_kd: CE plus the KD term summed over the student positions that have a teacher
    position (all, the first min(n_S, n_T), or the exact pairs), each divided by N-bar."""
    c, t, name = ob.cfg, ob.teacher, ob.cfg.objective
    n = len(labels)
    if name == "kd":  # same tokenizer: teacher position i is student position i
        if batch.teacher_hidden.shape[0] != n:
            raise ValueError(f"kd: {batch.teacher_hidden.shape[0]} cached teacher positions for {n} student "
                             f"labels in rows {batch.ids[:4]}... (a cross-tokenizer cache?)")
        s_rows, t_rows = torch.arange(n, device=labels.device), torch.arange(n, device=labels.device)
    elif name == "uld":  # the i-th response position of each side, up to the shorter response
        s_rows, t_rows = _first_positions(labels, batch)
    else:  # mined, overlap_kd: exactly aligned positions
        s_rows, t_rows = batch.align_student, batch.align_teacher
    if name == "overlap_kd":
        overlap = _overlap(t.vocab_map)
    pair = torch.full((n,), -1, dtype=torch.long, device=labels.device)
    pair[s_rows] = t_rows
    has = pair >= 0
    t_idx = pair.clamp(min=0)
    hidden_t = batch.teacher_hidden[t_idx] if t.dense else None
    sparse = ob.sparse(batch, t_idx)

    def fn(h, y, ht, sp, keep):
        z_s = student.head(h)
        target, err = teacher_target(t, ht, sp)
        if name == "kd":  # heads of one family padded to different sizes share the first min(V) ids
            v = min(z_s.shape[-1], t.head.vocab_size)
            per = ob.div(z_s[:, :v], target[:, :v] if t.dense else _truncate(target, v))
        elif name == "uld":
            per = sorted_l1(z_s, target, temperature=c.temperature)
        elif name == "mined":
            keep_t = t.mined_map >= 0
            log_p = _carry(ob, target, torch.nonzero(keep_t)[:, 0], t.mined_map[keep_t], z_s.shape[-1])
            per = _student_div(ob, log_p, z_s)
        else:
            t_ids, s_ids, s_index = overlap
            per = _student_div(ob, _carry(ob, target, t_ids, s_index, len(s_ids)), z_s[:, s_ids])
        return {"ce": cross_entropy_sum(z_s, y), "kd": (per * keep).sum(), "max_err": err}

    out = chunked(fn, n, ob.chunk, student.hidden, labels, hidden_t, sparse, has.float())
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


def _student_div(ob: ObjectiveBase, log_p: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
    """D(carried teacher || student) per position, the student's logits z_s over the same support as log_p."""
    c = ob.cfg
    log_q = F.log_softmax(z_s.float() / c.temperature, -1).clamp(min=LOG_FLOOR)
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
