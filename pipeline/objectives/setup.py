"""Set-up, shared by stage 2 (teacher from a cache) and online use (teacher resident): which objective needs what,
the projectors, and the student's side of a batch."""

from __future__ import annotations

import torch

from pipeline.batch import Batch
from pipeline.config import LossConfig
from pipeline.objectives.base import StudentSide, TeacherSide
from pipeline.projectors import Projectors

OBJECTIVES = ("sft", "kd", "dskd", "dskd_v2", "dskd_eta", "dskd_cma", "uld", "mined", "overlap_kd", "alm", "alm_eta")
NEEDS_TEACHER = {name: name != "sft" for name in OBJECTIVES}
SAME_VOCAB_ONLY = {"kd", "dskd", "dskd_v2"}
CROSS_VOCAB_ONLY = {"dskd_eta", "mined", "overlap_kd", "alm", "alm_eta"}
NEEDS_EMBEDDINGS = {"dskd_cma"}


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
                         "a cross-tokenizer cache (use dskd_eta, dskd_cma, uld, mined, overlap_kd, alm or alm_eta)")
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
    if cfg.objective in ("dskd_v2", "dskd_eta", "alm_eta"):
        s_ids, t_ids = shared_vocabulary(w_s.shape[0], teacher.head.vocab_size, vmap)
        proj.init_logit_identity(w_s, teacher.head.weight, s_ids.to(w_s.device), t_ids.to(w_s.device),
                                 init_t2s=cfg.init_t2s)
    return proj


def student_side(student, batch: Batch, hidden: torch.Tensor) -> StudentSide:
    """hidden (B, L, d_S) from the student's decoder -> the label positions the objectives use."""
    return StudentSide(hidden[batch.labels != -100], student.get_output_embeddings(), student.get_input_embeddings())
