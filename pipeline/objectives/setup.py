"""Set-up, shared by stage 2 (teacher from a cache) and online use (teacher resident): the projectors and their
initialisation, and the student's side of a batch."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.cache import views
from pipeline.cache.batch import Batch
from pipeline.cache.schema import recompute_tolerance
from pipeline.cache.store import CacheReader
from pipeline.config import LossConfig
from pipeline.losses import auto_chunk_positions
from pipeline.models.zero3 import detached_full
from pipeline.objectives.base import StudentSide, TeacherSide
from pipeline.objectives.dual_space import t2s_positions
from pipeline.objectives.projectors import Projectors
from pipeline.objectives.table import spec


def shared_vocabulary(student_vocab: int, teacher_vocab: int, vmap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the vocabulary U the logit-identity init fits on: every shared id for one
    tokenizer, else the token pairs with the same text, in teacher id order (not a dict's order, reference 12 #6)."""
    if vmap is None:
        ids = torch.arange(min(student_vocab, teacher_vocab))
        return ids, ids
    vmap = torch.as_tensor(vmap).long()
    t_ids = torch.nonzero(vmap >= 0)[:, 0]
    return vmap[t_ids], t_ids


# init_t2s auto keeps the fit when it beats the plain start's t2s_ce and goes at least this share of the way from a
# uniform guess to the teacher's own -log p(top-1). Through a random student head the fit is barely better than
# uniform (the tiny default: 6.365 vs ln 598 = 6.393 nats, 1% of the way) yet 15x the plain start's norm; through a
# head that means something it goes most of the way.
FIT_GAP_CLOSED = 0.5
INFORMATIVE_NATS = 0.1
# <run>/t2s_init.json: stage 2's `Projectors.init_report` (which start, both scores), read by `dskd report`
T2S_INIT_FILE = "t2s_init.json"


def build_projectors(cfg: LossConfig, student, teacher: TeacherSide, vmap=None, sample: list[Batch] = (), *,
                     weights_follow: bool = False) -> Projectors | None:
    """The objective's projectors for this student and teacher (None when it has none), initialised; `sample`:
    cached batches on which `loss.init_t2s: auto` scores both initialisations (`proj.init_report` says how), needed
    unless `weights_follow` (a resumed or continued run loads trained projectors over whatever start this is)."""

    if not spec(cfg.objective).projectors:
        return None
    w_s = student.get_output_embeddings().weight
    proj = Projectors(cfg.objective, w_s.shape[1], teacher.head.hidden_size).to(w_s.device)
    proj.init_report = {"t2s_init": "plain", "uniform_ce": math.log(w_s.shape[0])}
    if spec(cfg.objective).t2s_init == "logit_identity":  # DSKD v2's fit, scored against the plain start
        s_ids, t_ids = shared_vocabulary(w_s.shape[0], teacher.head.vocab_size, vmap)
        fit = proj.init_logit_identity(w_s, teacher.head.weight, s_ids.to(w_s.device), t_ids.to(w_s.device),
                                       init_t2s=cfg.init_t2s is True)
        if cfg.init_t2s == "auto" and not sample and not weights_follow:
            raise ValueError("loss.init_t2s: auto needs sample batches of the cache to score the initialisations")
        pick = "fit" if cfg.init_t2s is True else "plain"
        if sample:  # scored whatever the setting: `dskd report` flags a fit that went nowhere
            head = student.get_output_embeddings()
            plain = proj.t2s.weight.detach().float().clone() if cfg.init_t2s is not True else None
            scores = {"fit": t2s_scores(cfg.objective, fit, head, sample)}
            if plain is not None:
                scores["plain"] = t2s_scores(cfg.objective, plain, head, sample)
            # how much of the way from a uniform guess (ln V_S) to the teacher's own -log p(top-1) the fit goes; a
            # teacher no surer of its top-1 than a uniform guess has no way to go (its labels teach nothing)
            uniform, floor = proj.init_report["uniform_ce"], scores["fit"]["teacher_ce"]
            gap = uniform - floor
            closed = (uniform - scores["fit"]["ce"]) / gap if gap > INFORMATIVE_NATS else 0.0
            if cfg.init_t2s == "auto" and scores["fit"]["ce"] < scores["plain"]["ce"] and closed >= FIT_GAP_CLOSED:
                pick = "fit"
                with torch.no_grad():
                    proj.t2s.weight.copy_(fit.to(proj.t2s.weight.dtype))
            proj.init_report.update({"positions": scores["fit"]["positions"], "teacher_ce": floor,
                                     "fit_gap_closed": closed, **{f"t2s_init_{k}_{m}": scores[k][m] for k in scores
                                                                  for m in ("ce", "agreement")}})
        proj.init_report.update(t2s_init=pick, init_t2s=cfg.init_t2s)
    return proj


@torch.no_grad()
def t2s_scores(objective: str, weight: torch.Tensor, head: torch.nn.Module, batches: list[Batch]) -> dict[str, float]:
    """How a t2s weight (d_S x d_T) does on cached batches before any training: the mean t2s_ce of the projected
    teacher (through the student's head as it is now) on the objective's t2s labels, and its agreement (argmax ==
    label), over the positions `t2s_positions` trains; and the teacher's own mean -log p(top-1) there (the least a
    projected teacher trained on those labels approaches). No teacher pass: the hidden states are the cache's."""

    w_head = detached_full(head.weight).float()
    bias = getattr(head, "bias", None)
    b = None if bias is None else detached_full(bias).float()
    chunk = auto_chunk_positions(w_head.shape[0])
    ce = agree = teacher_ce = n = 0.0
    for batch in batches:
        labels = batch.labels[batch.labels != -100]
        _, t_rows, y = t2s_positions(objective, batch, labels)
        teacher_ce += float((batch.teacher_lse[t_rows] - batch.teacher_topk_logits[t_rows].max(-1).values).sum())
        h = batch.teacher_hidden[t_rows].float().to(w_head.device) @ weight.to(w_head.device).T
        y = y.to(w_head.device)
        for i in range(0, len(y), chunk):
            z = torch.nn.functional.linear(h[i : i + chunk], w_head, b)
            ce += float(torch.nn.functional.cross_entropy(z, y[i : i + chunk], reduction="sum"))
            agree += float((z.argmax(-1) == y[i : i + chunk]).sum())
        n += len(y)
    return {"ce": ce / max(n, 1), "agreement": agree / max(n, 1), "teacher_ce": teacher_ce / max(n, 1),
            "positions": int(n)}


def student_side(student, batch: Batch, hidden: torch.Tensor) -> StudentSide:
    """hidden (B, L, d_S) from the student's decoder -> the label positions the objectives use."""
    return StudentSide(hidden[batch.labels != -100], student.get_output_embeddings(), student.get_input_embeddings())


def teacher_from_cache(loss: LossConfig, reader: CacheReader, student_tok, device) -> tuple[TeacherSide, np.ndarray | None]:
    """The teacher's frozen pieces from the cache (whether it can serve the objective was checked before)."""
    m, objective = reader.manifest, loss.objective
    where, mode = str(reader.dir), loss.teacher_logits
    vmap = None if reader.same_tokenizer else reader.vocab_map()
    head = reader.load_head(device)
    teacher = TeacherSide(
        head=head,
        dense=m.head_exact if mode == "auto" else mode == "dense",
        check_tol=recompute_tolerance(m, head_dtype := str(head.weight.dtype).removeprefix("torch.")),
        check_source=f"a {m.hidden_encoding} cache ({where}; {head_dtype} head; logit error measured when it was "
                     f"built {max(m.storage_error['topk_max_error'], m.storage_error['lse_max_error']):.3g})",
        embeddings=reader.load_embeddings().to(device) if "embeddings" in spec(objective).needs else None,
        vocab_map=None if vmap is None else torch.from_numpy(vmap).long().to(device),
    )
    if "mined_map" in spec(objective).needs:
        mined = views.mined_map(reader, student_tok)
        teacher.mined_map = torch.from_numpy(mined).long().to(device)
    return teacher, vmap
