"""The DSKD family: dskd (v1), dskd_v2, dskd_eta and dskd_cma, each a student-space term (the projected teacher
taught through the student's head) and a teacher-space term (the projected student through the teacher's head)."""

from __future__ import annotations

import math

import torch

from pipeline.cache.batch import Batch
from pipeline.losses import cross_entropy_sum, labels_of, log_softmax
from pipeline.models.zero3 import detached_full
from pipeline.objectives.base import (
    ObjectiveBase,
    ObjectiveOutput,
    RowTerm,
    StudentSide,
    apply_projector,
    linear_sg,
    teacher_target,
)
from pipeline.objectives.chunks import After, chunked, pieces, recorded, student_and_projected, whole_groups
from pipeline.objectives.table import spec


def t2s_positions(name: str, batch: Batch, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student label positions, cached teacher positions, t2s labels) where the projected teacher is taught and
    teaches (the objective's `t2s_labels` in table.py): every position with v1's gold labels or v2's teacher argmax
    (one tokenizer), the exact-token pairs whose teacher top-1 has a student label (aligned: dskd_eta, alm_eta).
    labels: (N,) the student's labels at its label positions."""
    kind = spec(name).t2s_labels
    if kind == "aligned":
        valid = batch.align_label != -100
        return batch.align_student[valid], batch.align_teacher[valid], batch.align_label[valid]
    n = len(labels)
    if batch.teacher_hidden.shape[0] != n:
        raise ValueError(f"{name}: {batch.teacher_hidden.shape[0]} cached teacher positions for {n} student labels "
                         f"(rows {batch.ids[:4]}...); cross-tokenizer caches need dskd_eta or dskd_cma")
    rows = torch.arange(n, device=labels.device)
    if kind == "gold":
        return rows, rows, labels
    top = batch.teacher_topk_ids.gather(-1, batch.teacher_topk_logits.argmax(-1, keepdim=True))  # teacher argmax
    return rows, rows, top.squeeze(-1).long()


def student_space(ob: ObjectiveBase, student: StudentSide, labels, h_t2s, t2s_labels, t2s_rows, hints: dict,
                  extra: RowTerm | None = None, first: tuple | None = None) -> dict[str, torch.Tensor]:
    """Sums over the student's positions: ce; t2s_ce of the projected teacher on `t2s_labels`; the divergence
    between the student and the (stop-gradient) projected teacher over `t2s_rows`, and over the rows where
    the projected teacher's argmax equals its label ("agree"). `hints`: each term's weight in the loss
    (chunks.chunked). `extra`: a term of the student's label log-probabilities (alm_eta's chunk likelihoods, from
    the same head output), as "extra". `first`: `agreement`'s projected teacher logits and
    agreeing rows, when it took them already."""

    def fn(head, h, y, ht, yt, rows, group, kept, agree):
        z_s, z_t2s = student_and_projected(head, h, ht, kept)
        # at temperature 1 the divergence and the two CE terms share each side's log-softmax
        ls, lt = ob.shared_log_softmax(z_s), ob.shared_log_softmax(z_t2s)
        per = ob.div(z_s, z_t2s.detach(), student_log_probs=ls, teacher_log_probs=None if lt is None else lt.detach())
        agree = agreeing(z_t2s, yt, rows) if agree is None else agree
        # one log-softmax gives both the CE and alm's sums
        logp_y = labels_of(log_softmax(z_s) if ls is None else ls, y) if extra else None
        out = {
            "ce": -logp_y.sum() if extra else cross_entropy_sum(z_s, y, ls),
            "t2s_ce": cross_entropy_sum(z_t2s, torch.where(rows > 0, yt, -100), lt),
            "kd_rows": (per * rows).sum(),
            "kd_agree": (per * agree).sum(),
            "n_agree": agree.sum().float(),
        }
        if extra:
            out["extra"] = extra.fn(logp_y, group)
        return out

    group = None if extra is None else extra.group
    return chunked(fn, len(labels), ob.chunk, student.hidden, labels, h_t2s, t2s_labels, t2s_rows.float(), group,
                   *(first or (None, None)), head=student.head, hints={**hints, **({"extra": extra.hint} if extra else {})},
                   cuts=spans_of(extra), head_on_first=first is not None and first[0] is not None)


def spans_of(extra: RowTerm | None) -> torch.Tensor | None:
    """Where the student space's spans may start: anywhere, or between the groups of `extra`."""
    return None if extra is None else whole_groups(extra.group)


def agreeing(z_t2s: torch.Tensor, yt: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the t2s rows where the projected teacher's argmax is its label."""
    return (z_t2s.argmax(-1) == yt) & (yt != -100) & (rows > 0)


# up to this many chunks' rows, the agreement count's logits are kept for the chunks, or the masked term's agreeing
# rows wait for its weight (`chunks.After`): a bound on what either holds
KEPT_CHUNKS = 4


# the masked term waits for its weight only while its agreeing rows are expected below this fraction of the t2s rows
WAIT_FRACTION = 0.25


def wait_hint(masked: bool | None, agreeing: float, n: int, n_rows: int, chunk: int) -> After | None:
    """The masked term's hint `chunks.After` when waiting for its weight is cheaper than counting first, else None
    (count). Counting costs one product over the n positions' projected rows when it cannot keep their logits (more
    than KEPT_CHUNKS chunks of positions), nothing more when it can; waiting repeats the head's two products (the rows'
    gradient, the weight's) over the agreeing rows, at the small products' lower rate. So: the last micro-batch was
    masked, this one's positions are beyond the kept logits, and its expected agreeing rows (the last fraction
    `agreeing` of its `n_rows` t2s rows) are below WAIT_FRACTION of them and three quarters of the bound on the rows
    that may wait (a margin: more than the bound recompute the chunks)."""
    bound = KEPT_CHUNKS * chunk
    expected = agreeing * n_rows
    if masked and n > bound and expected <= min(0.75 * bound, WAIT_FRACTION * n_rows):
        return After(bound)
    return None


def agreement(ob: ObjectiveBase, student: StudentSide, h_t2s, t2s_labels, t2s_rows) -> tuple[float, tuple]:
    """(the count of agreeing t2s rows, (the projected teacher's logits or None, the agreeing rows)), taken before
    the fused chunks so that the masked term's weight, 1 / count, is known to them. One product without gradient
    over every row, whose logits the chunks then take instead of multiplying their projected rows again (the count
    costs no product), while they are at most KEPT_CHUNKS chunks' rows; beyond, spans of that many rows whose
    logits are dropped (the chunks multiply again). The chunks take the agreeing rows from here, so count and mask
    are one."""
    n, span = len(t2s_labels), KEPT_CHUNKS * ob.chunk
    with torch.no_grad():
        if n <= span:
            z = linear_sg(h_t2s, student.head)
            agree = agreeing(z, t2s_labels, t2s_rows)
            return float(agree.sum()), (z, agree)
        agree = torch.cat([agreeing(linear_sg(h_t2s[s:e], student.head), t2s_labels[s:e], t2s_rows[s:e])
                           for s, e in pieces(n, span)])
    return float(agree.sum()), (None, agree)


def teacher_space(ob: ObjectiveBase, batch: Batch, h_s2t: torch.Tensor, t_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sum over the given teacher positions of D(teacher, teacher head applied to the projected student)."""
    t = ob.teacher
    hidden_t = batch.teacher_hidden[t_rows] if t.dense else None

    def fn(_, hs, ht, sp):
        target, err = teacher_target(t, ht, sp)
        name = None if ob.cfg.s2t_divergence == "same" else ob.cfg.s2t_divergence
        return {"s2t_kd": ob.div(t.head.logits(hs), target, name).sum(), "max_err": err}

    return chunked(fn, len(t_rows), ob.chunk_for(t.head.vocab_size), h_s2t, hidden_t, ob.sparse(batch, t_rows))


def kd_terms(ob: ObjectiveBase, st: dict, te: dict | None, norm_t2s: float, t2s_kd: torch.Tensor, norm_s2t: float) -> dict:
    spaces = ob.cfg.spaces
    kd = {}
    if spaces in ("both", "student"):
        kd["t2s_ce"] = st["t2s_ce"] / norm_t2s
        kd["t2s_kd"] = t2s_kd
    if spaces in ("both", "teacher") and te is not None:
        kd["s2t_kd"] = te["s2t_kd"] / norm_s2t
    return kd


def dskd(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float) -> ObjectiveOutput:
    """dskd (v1), dskd_v2 (same vocabulary) and dskd_eta (exact-token alignments): which one, from its table entry."""
    ce, kd, stats, _ = dskd_terms(ob, batch, student, labels, normaliser)
    return ob.done(ce, kd, stats)


def dskd_terms(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float,
               extra: RowTerm | None = None) -> tuple[torch.Tensor, dict, dict, dict]:
    """(normalised ce, the KD terms, stats, the student-space sums) of `dskd`; alm_eta takes dskd_eta's, with its
    chunk term as `extra`."""
    c, s, proj = ob.cfg, ob.spec, ob.proj
    n, dev = len(labels), labels.device
    h_t = batch.teacher_hidden.float()
    s_rows, t_rows, t2s_y = t2s_positions(s.name, batch, labels)
    n_rows = len(s_rows)
    # v1 (gold labels): the projected teacher teaches at every position; v2: where it agrees with its label when
    # it agrees rarely (masked), as a local fraction; ETA normalises by the aligned positions
    local = s.t2s_labels == "aligned"
    t2s_norm = max(n_rows, 1e-3) if local else normaliser
    gold = s.t2s_labels == "gold"
    # student space: the projected teacher sits at the student positions it is aligned to (zeros elsewhere)
    h_t2s = torch.zeros(n, student.hidden.shape[-1], device=dev, dtype=student.hidden.dtype)
    h_t2s = h_t2s.index_copy(0, s_rows, apply_projector(proj.t2s, h_t[t_rows]).to(h_t2s.dtype))
    y_t2s = torch.full((n,), -100, dtype=torch.long, device=dev).index_copy(0, s_rows, t2s_y)
    rows = torch.zeros(n, dtype=torch.bool, device=dev).index_fill(0, s_rows, True)
    # the fused chunks need the masked term's weight, 1 / the agreeing count: the last micro-batch's choice guesses
    # (a wrong guess is recomputed in backward). Unmasked, it is known; masked, the term's gradient waits for it
    # where that is cheaper (`wait_hint`), else, or with no guess yet, the agreeing rows are counted first
    masked, n_first, first, cuts = False if gold else ob.masked_guess, None, None, spans_of(extra)
    wait = None
    if masked is not False and torch.is_grad_enabled() and len(pieces(n, ob.chunk, cuts)) > 1:
        # (a head the chunks do not record would keep the term apart: a backward more per chunk, so count)
        wait = wait_hint(masked, ob.agreement_guess, n, n_rows, ob.chunk) if recorded(student.head) else None
        if wait is None:
            n_first, first = agreement(ob, student, h_t2s, y_t2s, rows)
            masked = n_first / max(n_rows, 1) <= c.t2s_agreement
    hints = t2s_hints(ob, normaliser, t2s_norm, masked, n_first)
    if wait is not None:
        hints["kd_agree"] = wait
    st = student_space(ob, student, labels, h_t2s, y_t2s, rows, hints, extra, first)
    # teacher space
    te = None
    if c.spaces != "student":
        if s.s2t_learned:  # v1
            h_s2t = apply_projector(proj.s2t, student.hidden[s_rows])
        else:
            h_s2t = student.hidden[s_rows].float() @ proj.s2t_matrix(detached_full(student.head.weight))
        te = teacher_space(ob, batch, h_s2t, t_rows)
        ob.check(te["max_err"], batch)
    n_agree = float(st["n_agree"])
    if gold:
        kd = kd_terms(ob, st, te, normaliser, st["kd_rows"] / normaliser, normaliser)
    else:
        ob.agreement_guess = n_agree / max(n_rows, 1)
        masked = ob.masked_guess = ob.agreement_guess <= c.t2s_agreement
        t2s_kd = st["kd_agree"] / max(n_agree, 1e-3) if masked else st["kd_rows"] / t2s_norm
        kd = kd_terms(ob, st, te, t2s_norm, t2s_kd, max(n_rows, 1e-8) if local else normaliser)
    stats = {"t2s_agreement": n_agree / max(n_rows, 1), "aligned_positions": float(n_rows)}
    if te is not None:
        stats["teacher_max_err"] = float(te["max_err"])
    return st["ce"] / normaliser, kd, stats, st


def t2s_hints(ob: ObjectiveBase, normaliser: float, t2s_norm: float, masked: bool | None, n_agree: float | None,
              agree_only: bool = False) -> dict:
    """The student-space terms' weights in the loss, as `kd_terms` and the callers combine them (the agreeing
    rows' divergence, when masked, divided by their count `n_agree`)."""
    a = ob.kd_alpha if ob.cfg.spaces in ("both", "student") else 0.0
    if agree_only:
        rows_w, agree_w = 0.0, a / t2s_norm
    elif masked:
        rows_w, agree_w = 0.0, a / max(n_agree, 1e-3) if n_agree is not None else None
    else:
        rows_w, agree_w = a / t2s_norm, 0.0
    return {"ce": ob.ce_hint(normaliser), "t2s_ce": a / t2s_norm, "kd_rows": rows_w, "kd_agree": agree_w}


def dskd_cma(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float) -> ObjectiveOutput:
    """v1 cross-model attention (reference section 4): within each example, student position i attends over
    the teacher's cached positions j with scores from [E_S(x_i) | E_S(y_i)] W_q and [E_T(x_j) | E_T(y_j)];
    t2s values are t2s(h_T + E_T(y_T)) (y_T gold, or the teacher's argmax with `cma_value: argmax`), s2t
    values s2t(h_S) through the transposed scores. Scale statistics are the std over this micro-batch's
    response positions (the reference's includes prompt and pad positions, so it depended on padding)."""
    c, t, proj = ob.cfg, ob.teacher, ob.proj
    n, dev = len(labels), labels.device
    if t.embeddings is None or student.embeddings is None:
        raise ValueError("dskd_cma needs the teacher's and the student's input embeddings")
    e_s_tab, e_t_tab = detached_full(student.embeddings.weight).float(), t.embeddings.float()
    s_inputs = batch.input_ids[batch.labels != -100]
    s_row = torch.nonzero(batch.labels != -100)[:, 0]
    y_val = batch.teacher_labels if c.cma_value == "gold" else ob.sparse(batch).argmax()
    key = torch.cat([e_t_tab[batch.teacher_inputs], e_t_tab[batch.teacher_labels]], -1)
    key = key / key.std()
    h_t = batch.teacher_hidden.float()
    e_y = e_t_tab[y_val]
    value_t = apply_projector(proj.t2s, h_t / h_t.std() + e_y / e_y.std())  # (N_T, d_S)
    query = apply_projector(proj.query, torch.cat([e_s_tab[s_inputs], e_s_tab[labels]], -1))  # (N, 2 d_T)
    value_s = apply_projector(proj.s2t, student.hidden)  # (N, d_T)
    h_t2s = torch.zeros(n, student.hidden.shape[-1], device=dev)
    h_s2t = torch.zeros(h_t.shape[0], h_t.shape[-1], device=dev)
    scale = math.sqrt(key.shape[-1])
    for b in range(len(batch.ids)):  # attention stays inside one example
        i = torch.nonzero(s_row == b)[:, 0]
        j = torch.nonzero(batch.teacher_row == b)[:, 0]
        scores = query[i] @ key[j].T / scale  # (n_b, m_b)
        h_t2s = h_t2s.index_copy(0, i, scores.softmax(-1) @ value_t[j])
        h_s2t = h_s2t.index_copy(0, j, scores.T.softmax(-1) @ value_s[i])
    rows = torch.ones(n, dtype=torch.bool, device=dev)
    st = student_space(ob, student, labels, h_t2s.to(student.hidden.dtype), labels, rows,
                       t2s_hints(ob, normaliser, normaliser, False, None, agree_only=True))
    te = None
    if c.spaces != "student":
        te = teacher_space(ob, batch, h_s2t, torch.arange(h_t.shape[0], device=dev))
        ob.check(te["max_err"], batch)
    # the projected teacher teaches only where it predicts the gold token (reference: the wrong-teacher mask)
    kd = kd_terms(ob, st, te, normaliser, st["kd_agree"] / normaliser, normaliser)
    stats = {"t2s_agreement": float(st["n_agree"]) / max(n, 1)}
    if te is not None:
        stats["teacher_max_err"] = float(te["max_err"])
    return ob.done(st["ce"] / normaliser, kd, stats)
