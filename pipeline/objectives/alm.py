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
from pipeline.objectives.base import ObjectiveBase, ObjectiveOutput, StudentSide, chunked
from pipeline.objectives.dual_space import dskd_terms


def alm(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float) -> ObjectiveOutput:
    def fn(h, y):
        logp = label_log_probs(student.head(h), y)  # one log-softmax gives both the CE and the chunk sums
        return {"ce": -logp.sum(), "cat_logp": logp}

    out = chunked(fn, len(labels), ob.chunk, student.hidden, labels)
    term, stats = alm_term(ob, batch, out["cat_logp"], normaliser)
    return ob.done(out["ce"] / normaliser, {"alm": term}, stats)


def alm_eta(ob: ObjectiveBase, batch: Batch, student: StudentSide, labels: torch.Tensor,
            normaliser: float) -> ObjectiveOutput:
    ce, kd, stats, st = dskd_terms(ob, batch, student, labels, normaliser, logp=True)
    term, more = alm_term(ob, batch, st["cat_logp"], normaliser)
    return ob.done(ce, {**kd, "alm": term}, {**stats, **more})


def chunk_log_likelihoods(batch: Batch, student_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-likelihood of each of the batch's chunks, (n_chunks,) float32: the sums of the
    per-position log-probabilities (student_logp (N_S,), the cached teacher ones) over the chunk's positions."""
    if batch.chunk_student is None:
        raise ValueError(f"rows {batch.ids[:4]}...: no chunks (alm needs a cross-tokenizer cache of schema 4)")
    s_in, t_in = batch.chunk_student >= 0, batch.chunk_teacher >= 0
    ll_s = student_logp.new_zeros(batch.n_chunks).index_add(0, batch.chunk_student[s_in], student_logp[s_in])
    t_lp = batch.teacher_target_logprob.float()
    ll_t = t_lp.new_zeros(batch.n_chunks).index_add(0, batch.chunk_teacher[t_in], t_lp[t_in])
    return ll_s, ll_t


def alm_term(ob: ObjectiveBase, batch: Batch, student_logp: torch.Tensor, normaliser: float) -> tuple[torch.Tensor, dict]:
    """tau * sum over chunks of D(binarised teacher likelihood || binarised student likelihood) / N-bar, and stats."""
    c = ob.cfg
    tau = c.alm_temperature
    ll_s, ll_t = chunk_log_likelihoods(batch, student_logp)
    per = divergence_from_log_probs(c.divergence, binary_log_probs(ll_t / tau), binary_log_probs(ll_s / tau),
                                    skew=c.skew, akl_mu=c.akl_mu, beta=c.beta)
    covered = (batch.chunk_student >= 0).float().mean() if len(batch.chunk_student) else torch.zeros(())
    return tau * per.sum() / normaliser, {"chunks": float(batch.n_chunks), "chunk_coverage": float(covered)}
