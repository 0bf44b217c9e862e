"""Divergences as pure tensor functions (dense, or against a sparse top-k + tail teacher), the sorted-probability
distance of ULD, cross-entropy, and the global-batch token normaliser.

Conventions (reference section 2; this project's decisions in section 15):
- p = softmax(teacher / T) is the target, q = softmax(student / T) the learner:
  fkl = KL(p||q); rkl = KL(q||p); js = (KL(p||m) + KL(q||m)) / 2 with m = (p + q) / 2;
  skl = KL(p || skew p + (1 - skew) q); srkl = KL(q || skew q + (1 - skew) p); tvd = sum |p - q| / 2;
  akl = adaptive KL: (g_head fkl + g_tail rkl) / (g_head + g_tail), where the teacher's vocabulary is sorted by
  probability, the tail is the low-probability entries holding at most `akl_mu` of the teacher mass, and g is the
  detached L1 gap |p - q| summed over head and tail (a guarded denominator: p == q gives 0, not 0/0);
  gjsd = TRL's generalised Jensen-Shannon (GKD): beta KL(p||m) + (1 - beta) KL(q||m) with m = beta p + (1 - beta) q,
  i.e. beta skl(skew=beta) + (1 - beta) srkl(skew=1 - beta); as in TRL, beta = 0 is fkl and beta = 1 is rkl (the
  mixture form would vanish at both ends).
- `binary_log_probs` turns a log-probability into a two-outcome distribution (p, 1 - p), so every divergence above
  also compares two likelihoods (the binarised f-divergences of approximate likelihood matching).
- Everything is computed in float32 whatever the input dtype; there is no T^2 factor.
- Log-probabilities are floored at -1e4 (a probability of exactly 0 in float32) and mixtures are formed in log
  space, so -inf logits (masked vocabulary entries), underflowing probabilities and skew 0 or 1 never give NaN or
  inf, in values or gradients. The reference puts epsilons inside logs instead; here no epsilon changes a value.
- A sparse teacher (`SparseLogits`: top-k ids, their logits and the full log-sum-exp) becomes k + 1 buckets on both
  sides: the k ids and one tail bucket holding the remaining mass. With k = V there is no tail and the result equals
  the dense one. At temperature T != 1 the teacher's tail is treated as k' = V - k equal logits of the known total
  mass (the cache stores only the T = 1 log-sum-exp); at T = 1 every bucket is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIVERGENCES = ("fkl", "rkl", "js", "skl", "srkl", "tvd", "akl", "gjsd")

# log-probabilities below this are probabilities of exactly 0 in float32; flooring keeps every term and its
# gradient finite (0 * finite) where a -inf logit would otherwise give 0 * inf = NaN
LOG_FLOOR = -1e4


@dataclass
class SparseLogits:
    """A distribution known through its top-k: ids (..., k), their logits (..., k), log-sum-exp of all V logits (...)."""

    ids: torch.Tensor
    logits: torch.Tensor
    lse: torch.Tensor
    vocab_size: int

    def __getitem__(self, index) -> SparseLogits:
        return SparseLogits(self.ids[index], self.logits[index], self.lse[index], self.vocab_size)

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def argmax(self) -> torch.Tensor:
        return self.ids.gather(-1, self.logits.argmax(-1, keepdim=True)).squeeze(-1).long()

    def bucket_log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """(..., k + 1) float32 log-probabilities of the k ids and the tail (k only when k = V)."""
        z = self.logits.float()
        lse = self.lse.float().unsqueeze(-1)
        n_tail = self.vocab_size - self.k
        if n_tail <= 0:
            return F.log_softmax(z / temperature, dim=-1)
        top_mass = torch.logsumexp(z - lse, dim=-1, keepdim=True).clamp(max=0.0)
        tail = _log1mexp(top_mass) + lse  # log of the sum of exp(logit) over the tail, at T = 1
        if temperature != 1.0:  # mean-field: n_tail equal logits of the same total mass
            tail = math.log(n_tail) + (tail - math.log(n_tail)) / temperature
        return F.log_softmax(torch.cat([z / temperature, tail], dim=-1), dim=-1)

    def dense_log_probs(self, temperature: float = 1.0) -> torch.Tensor:
        """(..., V) log-probabilities: the k ids exact, the tail mass spread evenly over the other V - k ids."""
        buckets = self.bucket_log_probs(temperature)
        n_tail = self.vocab_size - self.k
        fill = buckets[..., -1:] - math.log(n_tail) if n_tail > 0 else buckets.new_full(buckets[..., :1].shape, -math.inf)
        out = fill.expand(*buckets.shape[:-1], self.vocab_size).clone()
        return out.scatter(-1, self.ids.long(), buckets[..., : self.k])


Teacher = torch.Tensor | SparseLogits


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _safe_log(w: float) -> float:
    return math.log(w) if w > 0 else LOG_FLOOR


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 logits / T (no copy at T = 1 for float32 input: at a 262k vocabulary each copy is 1 MB per position)."""
    z = logits.float()
    return z if temperature == 1.0 else z / temperature


def log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 log softmax(logits / T) over the last dimension."""
    return F.log_softmax(_scaled(logits, temperature), dim=-1)


def log_prob_pair(student_logits: torch.Tensor, teacher: Teacher, temperature: float,
                  student_log_probs: torch.Tensor | None = None,
                  teacher_log_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p teacher, log q student) over a common support, float32, floored: the V entries (dense teacher) or the
    k + 1 buckets (sparse teacher; the student's tail bucket is its exact mass outside the teacher's top-k ids).
    `student_log_probs` / `teacher_log_probs` (dense): `log_softmax(.., temperature)` of either side when the caller
    has it already (a cross-entropy term of the same logits), so it is not computed again; the teacher's is
    floored into a copy (the caller's may be saved for its own backward)."""
    log_q = floored(log_softmax(student_logits, temperature) if student_log_probs is None else student_log_probs)
    if isinstance(teacher, SparseLogits):
        ids = teacher.ids.long()
        top = log_q.gather(-1, ids)
        if teacher.vocab_size - teacher.k > 0:
            tail = log_q.scatter(-1, ids, LOG_FLOOR).logsumexp(-1, keepdim=True)
            top = torch.cat([top, tail], dim=-1)
        log_p = teacher.bucket_log_probs(temperature)
        return log_p.clamp(min=LOG_FLOOR), top.clamp(min=LOG_FLOOR)
    if teacher_log_probs is not None:
        return floored(teacher_log_probs), log_q
    log_p = log_softmax(teacher, temperature)
    # the target never needs its own graph here: floored in place when it must be (one vocabulary-sized tensor less)
    return floored(log_p, in_place=not log_p.requires_grad), log_q


def floored(log_probs: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """`log_probs` floored at LOG_FLOOR: the tensor itself when no entry is below it (as almost always: no
    vocabulary-sized copy, and clamp's gradient would be 1 everywhere), else clamped (in place when allowed)."""
    if log_probs.numel() == 0 or bool(log_probs.min() >= LOG_FLOOR):
        return log_probs
    return log_probs.clamp_(min=LOG_FLOOR) if in_place else log_probs.clamp(min=LOG_FLOOR)


def _kl(w: torch.Tensor, log_w: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:
    return (w * (log_w - log_other)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b), in log space (w = 0 or 1 exact)."""
    return torch.logaddexp(log_a + _safe_log(w), log_b + _safe_log(1 - w))


def divergence_from_log_probs(
    name: str, log_p: torch.Tensor, log_q: torch.Tensor, *, skew: float = 0.1, akl_mu: float = 0.5, beta: float = 0.5
) -> torch.Tensor:
    """Per-position divergence (...) from floored teacher log p and student log q over the same support (..., V)."""
    if name == "gjsd" and beta in (0.0, 1.0):  # TRL's branches: the plain KLs
        name = "fkl" if beta == 0.0 else "rkl"
    if name == "fkl":  # only p: each vocabulary-sized temporary counts at a 262k vocabulary
        return _kl(log_p.exp(), log_p, log_q)
    if name == "rkl":
        return _kl(log_q.exp(), log_q, log_p)
    p, q = log_p.exp(), log_q.exp()
    if name in ("js", "gjsd"):  # js is gjsd at beta = 1/2
        w = 0.5 if name == "js" else beta
        log_m = _log_mix(log_p, log_q, w)
        return w * _kl(p, log_p, log_m) + (1 - w) * _kl(q, log_q, log_m)
    if name == "skl":
        return _kl(p, log_p, _log_mix(log_p, log_q, skew))
    if name == "srkl":
        return _kl(q, log_q, _log_mix(log_q, log_p, skew))
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "akl":
        with torch.no_grad():
            p_sorted, order = p.sort(dim=-1)  # ascending: the tail comes first
            gap = (p_sorted - q.gather(-1, order)).abs()
            tail = p_sorted.cumsum(-1) <= akl_mu
            g_tail = (gap * tail).sum(-1)
            g_head = (gap * ~tail).sum(-1)
            denom = (g_head + g_tail).clamp(min=torch.finfo(torch.float32).tiny)
        return (g_head * _kl(p, log_p, log_q) + g_tail * _kl(q, log_q, log_p)) / denom
    raise ValueError(f"unknown divergence {name!r} (available: {', '.join(DIVERGENCES)})")


def reduce(per_pos: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """"none": per-position values, 0 where masked; "sum" over kept positions; "mean" over kept positions."""
    if mask is not None:
        per_pos = torch.where(mask, per_pos, torch.zeros_like(per_pos))
    if reduction == "none":
        return per_pos
    if reduction == "sum":
        return per_pos.sum()
    if reduction == "mean":
        count = per_pos.numel() if mask is None else int(mask.sum())
        return per_pos.sum() / max(count, 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    skew: float = 0.1,
    akl_mu: float = 0.5,
    beta: float = 0.5,
    reduction: str = "mean",
    student_log_probs: torch.Tensor | None = None,
    teacher_log_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """D(teacher || student) per position, reduced.

    student_logits (..., V); teacher_logits (..., V) or a SparseLogits over the same vocabulary; mask (...) bool,
    the positions to keep (None = all). reduction "none" -> (...), "sum" / "mean" -> scalar (see `reduce`).
    `student_log_probs` / `teacher_log_probs`: either side's `log_softmax` at `temperature`, when already taken
    (`log_prob_pair`)."""
    log_p, log_q = log_prob_pair(student_logits, teacher_logits, temperature, student_log_probs, teacher_log_probs)
    per_pos = divergence_from_log_probs(name, log_p, log_q, skew=skew, akl_mu=akl_mu, beta=beta)
    return reduce(per_pos, mask, reduction)


# a likelihood this close to 1 is treated as 1 - 1e-6: log(1 - p) and its gradient stay finite
BINARY_LOG_MAX = -1e-6


def binary_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """(..., 2) float32 floored log-probabilities (log p, log(1 - p)) of the two outcomes "this text" / "anything
    else", from a log-likelihood log_p (...) <= 0 (capped at BINARY_LOG_MAX)."""
    x = log_p.float().clamp(max=BINARY_LOG_MAX)
    return torch.stack([x, _log1mexp(x)], dim=-1).clamp(min=LOG_FLOOR)


def sorted_l1(student_logits: torch.Tensor, teacher: Teacher, *, temperature: float = 1.0) -> torch.Tensor:
    """ULD's distance (Boizard et al. 2024) per position: sum_i |q_(i) - p_(i)| over both distributions sorted in
    decreasing order, the shorter vocabulary padded with zeros, so no token correspondence is needed.

    student_logits (..., V_S); teacher (..., V_T) logits, or sparse: then the teacher's top-k plus its tail mass
    are compared with the student's own top-k plus its tail mass (a lower bound of the dense value, equal at k = V)."""
    q = F.softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, SparseLogits):
        p, k = teacher.bucket_log_probs(temperature).exp(), teacher.k
        p_sorted = torch.cat([p[..., :k].sort(-1, descending=True).values, p[..., k:]], dim=-1)
        q_sorted = q.topk(min(k, q.shape[-1]), dim=-1).values
        if p.shape[-1] > k:  # the tail is compared with the tail
            q_sorted = torch.cat([q_sorted, (1 - q_sorted.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
    else:
        p_sorted = F.softmax(teacher.float() / temperature, dim=-1).sort(-1, descending=True).values
        q_sorted = q.sort(-1, descending=True).values
    width = max(p_sorted.shape[-1], q_sorted.shape[-1])
    p_sorted = F.pad(p_sorted, (0, width - p_sorted.shape[-1]))
    q_sorted = F.pad(q_sorted, (0, width - q_sorted.shape[-1]))
    return (p_sorted - q_sorted).abs().sum(-1)


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(...) float32 log-probability of each label under softmax(logits) (0 where the label is -100).
    logits (..., V), labels (...)."""
    return labels_of(log_softmax(logits), labels)


def labels_of(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(...) the entries of `log_probs` (..., V) at `labels` (...), 0 where the label is -100."""
    lp = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == -100, torch.zeros_like(lp), lp)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of token cross-entropies in float32; labels -100 are ignored. logits (..., V), labels (...).
    `log_probs`: `log_softmax(logits)` when the caller has it (shared with a divergence of the same logits: one
    vocabulary-sized tensor and its backward less per position)."""
    if log_probs is not None:
        return -labels_of(log_probs, labels).sum()
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")


# one chunk of vocabulary-sized logits holds at most this many float32 values (64 MB). A divergence keeps about ten
# such tensors alive at once (logits of both sides, their log-softmax, probabilities, products, gradients), so a
# chunk costs about 0.7 GB whatever the vocabulary
CHUNK_ELEMENTS = 1 << 24


def auto_chunk_positions(vocab_size: int) -> int:
    """Positions per chunk such that one chunk's (positions x vocabulary) float32 logits stay within 64 MB, a power
    of two in [16, 1024] (1024 up to V = 16,384; 256 for SmolLM2's 49,152; 64 for Gemma-3's 262,144). A micro-batch
    with more label positions than that is chunked (objectives/chunks.py, each chunk's gradients taken in its forward
    pass): at 262k, with the checkpointed chunks before them, the 256-position chunks of a 256 MB budget made
    dskd_eta's stage 2 peak at 9.0 GB, 64-position chunks at 7.1 GB (SmolLM2-135M student, micro-batch 4)."""
    n = max(CHUNK_ELEMENTS // max(vocab_size, 1), 1)
    return int(min(1024, max(16, 1 << (n.bit_length() - 1))))


def token_normaliser(global_tokens: int, grad_accum: int, world_size: int) -> float:
    """N-bar of reference section 1.4: the mean number of loss tokens per micro-batch over the global batch.

    Each micro-batch loss is (sum over its tokens) / N-bar. The engine averages gradients over grad_accum x world,
    so the optimizer sees an exact token mean over the global batch, whatever the accumulation and world size.
    """
    return max(global_tokens, 1) / (grad_accum * world_size)


# --------------------------------------------------------------------------------------------------------------
# Reduced statistics: one convention for chunks of positions, micro-batches and ranks. A name with a `max_` word
# (`max_err`, `teacher_max_err`) is a maximum, every other one is a sum.


def is_maximum(name: str) -> bool:
    name = name.rsplit(".", 1)[-1]  # a teacher's own statistic among several: "<teacher>.<name>"
    return name.startswith("max_") or "_max_" in name


def accumulate(into: dict, got: dict) -> dict:
    """Fold `got` into `into` by the convention above; tensors or floats."""
    for k, v in got.items():
        if k not in into:
            into[k] = v
        elif is_maximum(k):
            into[k] = torch.maximum(into[k], v) if isinstance(v, torch.Tensor) else max(into[k], v)
        else:
            into[k] = into[k] + v
    return into
