"""alm and alm_eta: approximate likelihood matching (ALM; Minixhofer, Vulic and Ponti, "Universal Cross-Tokenizer
Distillation via Approximate Likelihood Matching", arXiv 2503.20083) on the chunks stored in the cache.

A chunk is a run of student tokens and a run of teacher tokens spelling the same text after the same preceding
text (`alignment.chunk_alignment`), so both models assign it a likelihood: the teacher's is the sum of its cached
next-token log-probabilities over the chunk (`target_logprob`, computed once in stage 1), the student's the sum of
its own. Every student response token lies in a chunk, numbers and rare words included, where exact token alignment
(dskd_eta, mined, overlap_kd) reaches only the 1:1 tokens.

The variant implemented, and why:
- Chunks: ALM's "unconstrained" chunks (every position where both tokenizations have a token boundary; tokenkit's
  `alm_unconstrained`, the one its examples pair with a next-token loss, as here). Not the "debiased" chunks, which
  merge chunks whose next-outcome probabilities differ between the tokenizers: that needs both models' full
  next-token distributions over word-boundary tokens at every chunk end plus precomputed tokenizer-pair statistics,
  and the cache keeps the teacher's top-k and hidden states, not those sums.
- Divergence: the paper's binarised f-divergence. A chunk's likelihood p becomes the two-outcome distribution
  (p^(1/tau), 1 - p^(1/tau)) for teacher and student, and `loss.divergence` compares them (fkl: the binary KL, whose
  gradient equals tokenkit's default binary cross-entropy's; every divergence of losses.py applies).
  tau = `loss.alm_temperature`, 100 by default as in tokenkit: without it a long chunk's likelihood is so small that
  1 - p is 1 on both sides and the divergence vanishes.
- Scale: tokenkit balances its losses' gradient magnitudes (GradMag); this project mixes (1 - alpha) CE + alpha KD
  with fixed weights, so the term is tau * D_bin. As tau grows, tau * KL_bin tends to A log(A / B) - A + B for the
  chunk's negative log-likelihoods A (teacher) and B (student): a gradient of order one per chunk at any tau
  (tokenkit's `binary_kl_temp_limit`), where D_bin alone shrinks as 1 / tau.
- Normalisation: the sum over the micro-batch's chunks divided by the global token normaliser N-bar, like CE, so
  accumulation and world size do not change the scale.
alm_eta adds dskd_eta's dual-space terms (t2s_ce, t2s_kd, s2t_kd) on the exact-token pairs, whose projectors it
trains: DSKD's projectors where tokens align 1:1, ALM's coverage everywhere.
"""

from __future__ import annotations

import torch

from pipeline.cache.batch import Batch
from pipeline.losses import binary_log_probs, divergence_from_log_probs, label_log_probs
from pipeline.objectives.base import ObjectiveBase, ObjectiveOutput, RowTerm, StudentSide
from pipeline.objectives.chunks import chunked, whole_groups
from pipeline.objectives.dual_space import dskd_terms


def alm(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float) -> ObjectiveOutput:
    term, rest, stats = alm_term(ob, batch, normaliser)

    def fn(head, h, y, group):
        logp = label_log_probs(head(h), y)  # one log-softmax gives both the CE and the chunk sums
        return {"ce": -logp.sum(), "alm": term.fn(logp, group)}

    out = chunked(fn, len(labels), ob.chunk, student.hidden, labels, term.group, head=student.head,
                  hints={"ce": ob.ce_hint(normaliser), "alm": term.hint}, cuts=whole_groups(term.group),
                  head_on_first=True)
    return ob.done(out["ce"] / normaliser, {"alm": (out["alm"] + rest) / normaliser}, stats)


def alm_eta(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor,
            normaliser: float) -> ObjectiveOutput:
    term, rest, more = alm_term(ob, batch, normaliser)
    ce, kd, stats, st = dskd_terms(ob, batch, student, labels, normaliser, extra=term)
    return ob.done(ce, {**kd, "alm": (st["extra"] + rest) / normaliser}, {**stats, **more})


def teacher_chunk_log_likelihoods(batch: Batch) -> torch.Tensor:
    """(n_chunks,) float32: the teacher's log-likelihood of each of the batch's chunks, the sum of its cached
    next-token log-probabilities over the chunk's positions."""
    if batch.chunk_student is None:
        raise ValueError(f"rows {batch.ids[:4]}...: no chunks (alm needs a cross-tokenizer cache of schema 4)")
    t_in = batch.chunk_teacher >= 0
    t_lp = batch.teacher_target_logprob.float()
    return t_lp.new_zeros(batch.n_chunks).index_add(0, batch.chunk_teacher[t_in], t_lp[t_in])


def alm_term(ob: ObjectiveBase, batch: Batch, normaliser: float) -> tuple[RowTerm, torch.Tensor, dict]:
    """tau * sum over chunks of D(binarised teacher likelihood || binarised student likelihood), split in two: a
    `RowTerm` over the student's label rows (the chunks with a student row: their student likelihood is the sum of
    the rows' log-probabilities) and the constant of the chunks without one (student likelihood 1); and stats.
    The caller divides their sum by N-bar."""
    c = ob.cfg
    tau = c.alm_temperature
    ll_t = teacher_chunk_log_likelihoods(batch)

    def per_chunk(ll_s: torch.Tensor, ll_t_c: torch.Tensor) -> torch.Tensor:
        return tau * divergence_from_log_probs(c.divergence, binary_log_probs(ll_t_c / tau), binary_log_probs(ll_s / tau),
                                               skew=c.skew, akl_mu=c.akl_mu, beta=c.beta).sum()

    def fn(logp: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        inside = group >= 0
        ids, local = torch.unique(group[inside], return_inverse=True)
        ll_s = logp.new_zeros(len(ids)).index_add(0, local, logp[inside])
        return per_chunk(ll_s, ll_t[ids])

    group = batch.chunk_student
    seen = torch.zeros(batch.n_chunks, dtype=torch.bool, device=ll_t.device)
    seen[group[group >= 0]] = True
    rest = per_chunk(ll_t.new_zeros(int((~seen).sum())), ll_t[~seen])
    covered = (group >= 0).float().mean() if len(group) else torch.zeros(())
    stats = {"chunks": float(batch.n_chunks), "chunk_coverage": float(covered)}
    return RowTerm(fn, group, ob.kd_alpha / normaliser), rest, stats
