"""Objectives: compose a Batch, the student's hidden states, the projectors and the losses into one training loss.

Every objective is L = (1 - alpha) * CE + alpha * KD (reference sections 2-7), each term already normalised:
- sft        CE only, alpha ignored (seqkd is sft on teacher-generated responses).
- kd         KD = D(teacher, student) in the shared vocabulary (heads of one family truncated to the shared ids).
- dskd       v1, same vocabulary: KD = t2s_kd + t2s_ce (gold labels) + s2t_kd, projectors t2s and s2t trained.
- dskd_v2    same vocabulary: t2s initialised by logit identity, t2s_ce on the teacher's argmax, t2s_kd masked to
             positions where the projected teacher agrees with the teacher (a local fraction), s2t from the heads.
- dskd_eta   dskd_v2 across vocabularies on the cached exact-token alignments (labels: the teacher's top-1 mapped
             to the student id with the same text, -100 when there is none).
- dskd_cma   v1 cross-model attention: student queries attend over the teacher's positions of the same example.
- uld        sorted-probability L1 between the i-th response positions of both sides (any vocabularies).
- mined      the teacher's distribution carried into the student vocabulary by a minimum-edit-distance token map,
             at the exactly aligned positions.
Normalisation: sums are divided by the global token normaliser N-bar (losses.token_normaliser) so accumulation and
world size do not change the scale; v2's agreement-masked and ETA terms use local counts, as the reference does.
Memory: vocabulary-sized tensors are only built inside `_chunked`, a chunk of positions at a time, recomputed in
backward, so no objective holds more than one chunk's (positions, vocabulary) logits per space.
The teacher model is never needed: its logits come from cached hidden states x its head (dense) or from the cached
top-k + log-sum-exp (sparse), and `teacher_max_err` proves the dense recomputation against the cached top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.batch import Batch
from pipeline.config import LossConfig
from pipeline.head import OutputHead
from pipeline.losses import (
    LOG_FLOOR,
    SparseLogits,
    auto_chunk_positions,
    cross_entropy_sum,
    divergence,
    divergence_from_log_probs,
    sorted_l1,
)
from pipeline.models import detached_full
from pipeline.projectors import Projectors

OBJECTIVES = ("sft", "kd", "dskd", "dskd_v2", "dskd_eta", "dskd_cma", "uld", "mined")
NEEDS_TEACHER = {name: name != "sft" for name in OBJECTIVES}
SAME_VOCAB_ONLY = {"kd", "dskd", "dskd_v2"}
CROSS_VOCAB_ONLY = {"dskd_eta", "mined"}
NEEDS_EMBEDDINGS = {"dskd_cma"}


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
    check_tol: float = 1e-2  # derived from how the cache was stored (cache_schema.recompute_tolerance)
    check_source: str = "the cache"  # named when the check fails
    embeddings: torch.Tensor | None = None  # (V_T, d_T), dskd_cma
    mined_map: torch.Tensor | None = None  # (V_T,) long teacher id -> student id (mined)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # scalar: (1 - alpha) * ce + alpha * kd
    terms: dict[str, torch.Tensor]  # each term, normalised as it enters the loss (differentiable)
    stats: dict[str, float] = field(default_factory=dict)  # logged only (agreement, teacher_max_err, ...)


# --------------------------------------------------------------------------------------------------------------
# Chunks of positions


def _chunked(fn, n: int, size: int, *args) -> dict[str, torch.Tensor]:
    """fn(*rows) -> dict of scalar tensors, over chunks of `size` rows of each tensor / SparseLogits in `args`
    (None passes through); values are summed over chunks, keys starting with "max_" maxed. Under autograd each
    chunk is checkpointed, so its (rows, vocabulary) intermediates are recomputed in backward, not kept."""
    if n <= size:
        return fn(*args)
    out: dict[str, torch.Tensor] = {}
    grad = torch.is_grad_enabled()
    for start in range(0, n, size):
        part = [a if a is None else a[start : start + size] for a in args]
        got = checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part)
        for k, v in got.items():
            out[k] = v if k not in out else (torch.maximum(out[k], v) if k.startswith("max_") else out[k] + v)
    return out


def _linear_sg(h: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """h @ sg(W)^T (+ sg(b)): the student head applied without training it (projected-teacher logits)."""
    bias = getattr(head, "bias", None)
    w, b = detached_full(head.weight), None if bias is None else detached_full(bias)
    return F.linear(h.to(w.dtype), w, b)


def _teacher_target(teacher: TeacherSide, hidden: torch.Tensor | None, sparse: SparseLogits) -> tuple:
    """(target, max error): dense logits recomputed from hidden states (checked against the cached top-k), or the
    sparse top-k + tail itself."""
    if not teacher.dense:
        return sparse, sparse.lse.new_zeros(())
    with torch.no_grad():
        z = teacher.head.logits(hidden)
        err = torch.maximum(_max_abs(z.gather(-1, sparse.ids.long()) - sparse.logits),
                            _max_abs(torch.logsumexp(z, -1) - sparse.lse))
    return z, err


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A projector on x in the projector's dtype (bf16 under mixed precision), result in float32."""
    return module(x.to(module.weight.dtype)).float()


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().max() if x.numel() else x.new_zeros(())


# --------------------------------------------------------------------------------------------------------------
# The objective


class Objective:
    """One objective, configured once per run; call it per micro-batch."""

    def __init__(
        self, cfg: LossConfig, teacher: TeacherSide | None = None, projectors: Projectors | None = None,
        chunk_positions: int = 0,
    ):
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {cfg.objective!r}")
        if NEEDS_TEACHER[cfg.objective] and teacher is None:
            raise ValueError(f"objective {cfg.objective!r} needs the teacher's head (a teacher cache)")
        self.cfg, self.teacher, self.proj, self.chunk = cfg, teacher, projectors, chunk_positions

    # ---- shared pieces

    def _div(self, student_logits, target) -> torch.Tensor:
        c = self.cfg
        return divergence(c.divergence, student_logits, target, temperature=c.temperature, skew=c.skew,
                          akl_mu=c.akl_mu, reduction="none")

    def _sparse(self, batch: Batch, rows: torch.Tensor | None = None) -> SparseLogits:
        s = SparseLogits(batch.teacher_topk_ids, batch.teacher_topk_logits, batch.teacher_lse, self.teacher.head.vocab_size)
        return s if rows is None else s[rows]

    def _done(self, ce: torch.Tensor, kd: dict[str, torch.Tensor], stats: dict) -> ObjectiveOutput:
        a = self.cfg.alpha
        total_kd = sum(kd.values())
        loss = (1 - a) * ce + a * total_kd
        terms = {"ce": ce, "kd": total_kd, **kd}
        return ObjectiveOutput(loss, terms, stats)

    # ---- entry point

    def __call__(self, batch: Batch, student: StudentSide, normaliser: float) -> ObjectiveOutput:
        """student.hidden holds the N label positions of `batch` (labels != -100, row-major)."""
        labels = batch.labels[batch.labels != -100]
        name = self.cfg.objective
        if not self.chunk:  # automatic: from the largest vocabulary in play (ZeRO-3 keeps out_features when partitioned)
            v = getattr(student.head, "out_features", None) or student.head.weight.shape[0]
            self.chunk = auto_chunk_positions(max(v, self.teacher.head.vocab_size if self.teacher else 0))
        if name == "sft":
            out = _chunked(lambda h, y: {"ce": cross_entropy_sum(student.head(h), y)}, len(labels), self.chunk,
                           student.hidden, labels)
            ce = out["ce"] / normaliser  # the whole loss: alpha weighs CE against a KD term, and sft has none
            return ObjectiveOutput(ce, {"ce": ce}, {})
        if name in ("kd", "uld", "mined"):
            return self._student_space_kd(batch, student, labels, normaliser)
        if name == "dskd_cma":
            return self._dskd_cma(batch, student, labels, normaliser)
        return self._dskd(batch, student, labels, normaliser)

    # ---- kd / uld / mined: the teacher's distribution compared in the student's space

    def _student_space_kd(self, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float):
        c, t, name = self.cfg, self.teacher, self.cfg.objective
        n = len(labels)
        if name == "kd":  # same tokenizer: teacher position i is student position i
            if batch.teacher_hidden.shape[0] != n:
                raise ValueError(f"kd: {batch.teacher_hidden.shape[0]} cached teacher positions for {n} student "
                                 f"labels in rows {batch.ids[:4]}... (a cross-tokenizer cache?)")
            s_rows, t_rows = torch.arange(n, device=labels.device), torch.arange(n, device=labels.device)
        elif name == "uld":  # the i-th response position of each side, up to the shorter response
            s_rows, t_rows = _first_positions(labels, batch)
        else:  # mined: exactly aligned positions
            s_rows, t_rows = batch.align_student, batch.align_teacher
        pair = torch.full((n,), -1, dtype=torch.long, device=labels.device)
        pair[s_rows] = t_rows
        has = pair >= 0
        t_idx = pair.clamp(min=0)
        hidden_t = batch.teacher_hidden[t_idx] if t.dense else None
        sparse = self._sparse(batch, t_idx)

        def fn(h, y, ht, sp, keep):
            z_s = student.head(h)
            target, err = _teacher_target(t, ht, sp)
            if name == "kd":  # heads of one family padded to different sizes share the first min(V) ids
                v = min(z_s.shape[-1], t.head.vocab_size)
                per = self._div(z_s[:, :v], target[:, :v] if t.dense else _truncate(target, v))
            elif name == "uld":
                per = sorted_l1(z_s, target, temperature=c.temperature)
            else:
                per = self._mined(z_s, target)
            return {"ce": cross_entropy_sum(z_s, y), "kd": (per * keep).sum(), "max_err": err}

        out = _chunked(fn, n, self.chunk, student.hidden, labels, hidden_t, sparse, has.float())
        self._check(out["max_err"], batch)
        return self._done(out["ce"] / normaliser, {"kd": out["kd"] / normaliser},
                          {"teacher_max_err": float(out["max_err"]), "kd_positions": float(has.sum())})

    def _mined(self, z_s: torch.Tensor, target) -> torch.Tensor:
        """D between the student and the teacher's probabilities summed into the student ids of the token map."""
        c, t = self.cfg, self.teacher
        log_p_t = target.dense_log_probs(c.temperature) if isinstance(target, SparseLogits) else \
            F.log_softmax(target.float() / c.temperature, -1)
        keep = t.mined_map >= 0
        mass = torch.zeros(z_s.shape, device=z_s.device).index_add_(
            -1, t.mined_map[keep], log_p_t[:, keep].exp())
        log_p = torch.log(mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)).clamp(min=LOG_FLOOR)
        log_q = F.log_softmax(z_s.float() / c.temperature, -1).clamp(min=LOG_FLOOR)
        return divergence_from_log_probs(c.divergence, log_p, log_q, skew=c.skew, akl_mu=c.akl_mu)

    def _check(self, err: torch.Tensor, batch: Batch) -> None:
        e = float(err)
        if not e <= self.teacher.check_tol:  # also catches NaN
            raise TeacherMismatch(
                f"teacher logits recomputed from cached hidden states x head differ from the cached top-k by {e:.3g} "
                f"in rows {batch.ids[:4]}..., more than the {self.teacher.check_tol:.3g} allowed for "
                f"{self.teacher.check_source}: the rows' hidden states, top-k or head do not belong together "
                "(check with `dskd cache verify`; loss.teacher_logits: sparse trains from the top-k alone)"
            )

    # ---- the two spaces of DSKD

    def _student_space(self, student: StudentSide, labels, h_t2s, t2s_labels, t2s_rows) -> dict[str, torch.Tensor]:
        """Sums over the student's positions: ce; t2s_ce of the projected teacher on `t2s_labels`; the divergence
        between the student and the (stop-gradient) projected teacher over `t2s_rows`, and over the rows where
        the projected teacher's argmax equals its label ("agree")."""

        def fn(h, y, ht, yt, rows):
            z_s = student.head(h)
            z_t2s = _linear_sg(ht, student.head)
            per = self._div(z_s, z_t2s.detach())
            agree = (z_t2s.argmax(-1) == yt) & (yt != -100) & (rows > 0)
            return {
                "ce": cross_entropy_sum(z_s, y),
                "t2s_ce": cross_entropy_sum(z_t2s, torch.where(rows > 0, yt, -100)),
                "kd_rows": (per * rows).sum(),
                "kd_agree": (per * agree).sum(),
                "n_agree": agree.sum().float(),
            }

        return _chunked(fn, len(labels), self.chunk, student.hidden, labels, h_t2s, t2s_labels, t2s_rows.float())

    def _teacher_space(self, batch: Batch, h_s2t: torch.Tensor, t_rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sum over the given teacher positions of D(teacher, teacher head applied to the projected student)."""
        t = self.teacher
        hidden_t = batch.teacher_hidden[t_rows] if t.dense else None

        def fn(hs, ht, sp):
            target, err = _teacher_target(t, ht, sp)
            return {"s2t_kd": self._div(t.head.logits(hs), target).sum(), "max_err": err}

        return _chunked(fn, len(t_rows), self.chunk, h_s2t, hidden_t, self._sparse(batch, t_rows))

    def _kd_terms(self, st: dict, te: dict | None, norm_t2s: float, t2s_kd: torch.Tensor, norm_s2t: float) -> dict:
        spaces = self.cfg.spaces
        kd = {}
        if spaces in ("both", "student"):
            kd["t2s_ce"] = st["t2s_ce"] / norm_t2s
            kd["t2s_kd"] = t2s_kd
        if spaces in ("both", "teacher") and te is not None:
            kd["s2t_kd"] = te["s2t_kd"] / norm_s2t
        return kd

    def _dskd(self, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float) -> ObjectiveOutput:
        """dskd (v1), dskd_v2 (same vocabulary) and dskd_eta (exact-token alignments)."""
        c, name, proj = self.cfg, self.cfg.objective, self.proj
        n, dev = len(labels), labels.device
        h_t = batch.teacher_hidden.float()
        if name == "dskd_eta":
            valid = batch.align_label != -100
            s_rows, t_rows, t2s_y = batch.align_student[valid], batch.align_teacher[valid], batch.align_label[valid]
        else:
            if h_t.shape[0] != n:
                raise ValueError(f"{name}: {h_t.shape[0]} cached teacher positions for {n} student labels "
                                 f"(rows {batch.ids[:4]}...); cross-tokenizer caches need dskd_eta or dskd_cma")
            s_rows = t_rows = torch.arange(n, device=dev)
            t2s_y = labels if name == "dskd" else self._sparse(batch).argmax()  # v1: gold; v2: teacher argmax
        # student space: the projected teacher sits at the student positions it is aligned to (zeros elsewhere)
        h_t2s = torch.zeros(n, student.hidden.shape[-1], device=dev, dtype=student.hidden.dtype)
        h_t2s = h_t2s.index_copy(0, s_rows, _apply(proj.t2s, h_t[t_rows]).to(h_t2s.dtype))
        y_t2s = torch.full((n,), -100, dtype=torch.long, device=dev).index_copy(0, s_rows, t2s_y)
        rows = torch.zeros(n, dtype=torch.bool, device=dev).index_fill(0, s_rows, True)
        st = self._student_space(student, labels, h_t2s, y_t2s, rows)
        # teacher space
        te = None
        if c.spaces != "student":
            if name == "dskd":
                h_s2t = _apply(proj.s2t, student.hidden[s_rows])
            else:
                h_s2t = student.hidden[s_rows].float() @ proj.s2t_matrix(detached_full(student.head.weight))
            te = self._teacher_space(batch, h_s2t, t_rows)
            self._check(te["max_err"], batch)
        n_rows, n_agree = len(s_rows), float(st["n_agree"])
        if name == "dskd":
            kd = self._kd_terms(st, te, normaliser, st["kd_rows"] / normaliser, normaliser)
        else:
            # the projected teacher is trusted only where it agrees with its label, as a local fraction
            masked = n_agree / max(n_rows, 1) <= c.t2s_agreement
            local = name == "dskd_eta"
            t2s_norm = max(n_rows, 1e-3) if local else normaliser
            t2s_kd = st["kd_agree"] / max(n_agree, 1e-3) if masked else st["kd_rows"] / t2s_norm
            kd = self._kd_terms(st, te, t2s_norm, t2s_kd, max(n_rows, 1e-8) if local else normaliser)
        stats = {"t2s_agreement": n_agree / max(n_rows, 1), "aligned_positions": float(n_rows)}
        if te is not None:
            stats["teacher_max_err"] = float(te["max_err"])
        return self._done(st["ce"] / normaliser, kd, stats)

    def _dskd_cma(self, batch: Batch, student: StudentSide, labels: torch.Tensor, normaliser: float) -> ObjectiveOutput:
        """v1 cross-model attention (reference section 4): within each example, student position i attends over
        the teacher's cached positions j with scores from [E_S(x_i) | E_S(y_i)] W_q and [E_T(x_j) | E_T(y_j)];
        t2s values are t2s(h_T + E_T(y_T)) (y_T gold, or the teacher's argmax with `cma_value: argmax`), s2t
        values s2t(h_S) through the transposed scores. Scale statistics are the std over this micro-batch's
        response positions (the reference's includes prompt and pad positions, so it depended on padding)."""
        c, t, proj = self.cfg, self.teacher, self.proj
        n, dev = len(labels), labels.device
        if t.embeddings is None or student.embeddings is None:
            raise ValueError("dskd_cma needs the teacher's and the student's input embeddings")
        e_s_tab, e_t_tab = detached_full(student.embeddings.weight).float(), t.embeddings.float()
        s_inputs = batch.input_ids[batch.labels != -100]
        s_row = torch.nonzero(batch.labels != -100)[:, 0]
        y_val = batch.teacher_labels if c.cma_value == "gold" else self._sparse(batch).argmax()
        key = torch.cat([e_t_tab[batch.teacher_inputs], e_t_tab[batch.teacher_labels]], -1)
        key = key / key.std()
        h_t = batch.teacher_hidden.float()
        e_y = e_t_tab[y_val]
        value_t = _apply(proj.t2s, h_t / h_t.std() + e_y / e_y.std())  # (N_T, d_S)
        query = _apply(proj.query, torch.cat([e_s_tab[s_inputs], e_s_tab[labels]], -1))  # (N, 2 d_T)
        value_s = _apply(proj.s2t, student.hidden)  # (N, d_T)
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
        st = self._student_space(student, labels, h_t2s.to(student.hidden.dtype), labels, rows)
        te = None
        if c.spaces != "student":
            te = self._teacher_space(batch, h_s2t, torch.arange(h_t.shape[0], device=dev))
            self._check(te["max_err"], batch)
        # the projected teacher teaches only where it predicts the gold token (reference: the wrong-teacher mask)
        kd = self._kd_terms(st, te, normaliser, st["kd_agree"] / normaliser, normaliser)
        stats = {"t2s_agreement": float(st["n_agree"]) / max(n, 1)}
        if te is not None:
            stats["teacher_max_err"] = float(te["max_err"])
        return self._done(st["ce"] / normaliser, kd, stats)


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


# --------------------------------------------------------------------------------------------------------------
# Set-up, shared by stage 2 (teacher from a cache) and online use (teacher resident)


def shared_vocabulary(student_vocab: int, teacher_vocab: int, vmap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the vocabulary U the logit-identity init fits on: every shared id for one
    tokenizer, else the token pairs with the same text, in teacher id order (not a dict's order, reference 12 #6)."""
    if vmap is None:
        ids = torch.arange(min(student_vocab, teacher_vocab))
        return ids, ids
    vmap = torch.as_tensor(vmap).long()
    t_ids = torch.nonzero(vmap >= 0)[:, 0]
    return vmap[t_ids], t_ids


def check_compatible(objective: str, same_tokenizer: bool, has_embeddings: bool, where: str) -> None:
    """A clear error when the cache cannot serve the objective."""
    if objective in SAME_VOCAB_ONLY and not same_tokenizer:
        raise ValueError(f"objective {objective!r} needs the teacher and the student to share a tokenizer; {where} is "
                         "a cross-tokenizer cache (use dskd_eta, dskd_cma, uld or mined)")
    if objective in CROSS_VOCAB_ONLY and same_tokenizer:
        raise ValueError(f"objective {objective!r} is for different tokenizers; {where} has one tokenizer "
                         "(use kd or dskd_v2)")
    if objective in NEEDS_EMBEDDINGS and not has_embeddings:
        raise ValueError(f"objective {objective!r} needs the teacher's input embeddings; {where} was built without "
                         "them (rebuild it with cache.store_embeddings: true)")


def build_projectors(cfg: LossConfig, student, teacher: TeacherSide, vmap=None) -> Projectors | None:
    """The objective's projectors for this student and teacher (None when it has none), initialised."""
    from pipeline.projectors import PROJECTORS

    if cfg.objective not in PROJECTORS:
        return None
    w_s = student.get_output_embeddings().weight
    proj = Projectors(cfg.objective, w_s.shape[1], teacher.head.hidden_size).to(w_s.device)
    if cfg.objective in ("dskd_v2", "dskd_eta"):
        s_ids, t_ids = shared_vocabulary(w_s.shape[0], teacher.head.vocab_size, vmap)
        proj.init_logit_identity(w_s, teacher.head.weight, s_ids.to(w_s.device), t_ids.to(w_s.device),
                                 init_t2s=cfg.init_t2s)
    return proj


def student_side(student, batch: Batch, hidden: torch.Tensor) -> StudentSide:
    """hidden (B, L, d_S) from the student's decoder -> the label positions the objectives use."""
    return StudentSide(hidden[batch.labels != -100], student.get_output_embeddings(), student.get_input_embeddings())
