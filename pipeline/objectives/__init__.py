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
- overlap_kd KD at the exactly aligned positions on the shared sub-vocabulary (tokens of the same text), both
             distributions renormalised there.
- alm        approximate likelihood matching: the chunk likelihoods of both sides (every student token lies in a
             chunk) compared with a binarised divergence (objectives/alm.py says which variant and why).
- alm_eta    alm plus dskd_eta's dual-space terms on the exactly aligned positions.
- s2t_divergence: fkl reproduces DSKD v1, which uses forward KL in the teacher-space term whatever the divergence.
Normalisation: sums are divided by the global token normaliser N-bar (losses.token_normaliser) so accumulation and
world size do not change the scale; v2's agreement-masked and ETA terms use local counts, as the reference does.
Memory: vocabulary-sized tensors are only built inside `base.chunked`, a chunk of positions at a time, recomputed in
backward, so no objective holds more than one chunk's (positions, vocabulary) logits per space.
The teacher model is never needed: its logits come from cached hidden states x its head (dense) or from the cached
top-k + log-sum-exp (sparse), and `teacher_max_err` proves the dense recomputation against the cached top-k.
"""

from __future__ import annotations

from pipeline.batch import Batch
from pipeline.config import LossConfig
from pipeline.losses import auto_chunk_positions, cross_entropy_sum
from pipeline.objectives.alm import alm, alm_eta
from pipeline.objectives.base import (
    ObjectiveBase,
    ObjectiveOutput,
    StudentSide,
    TeacherMismatch,
    TeacherSide,
    chunked,
    detached_side,
    term_grad_norms,
)
from pipeline.objectives.dual_space import dskd, dskd_cma
from pipeline.objectives.setup import (
    CROSS_VOCAB_ONLY,
    LOGIT_IDENTITY,
    NEEDS_EMBEDDINGS,
    NEEDS_TEACHER,
    OBJECTIVES,
    SAME_VOCAB_ONLY,
    T2S_INIT_FILE,
    build_projectors,
    check_compatible,
    shared_vocabulary,
    student_side,
)
from pipeline.objectives.student_space import student_space_kd
from pipeline.projectors import Projectors

__all__ = [
    "CROSS_VOCAB_ONLY", "LOGIT_IDENTITY", "NEEDS_EMBEDDINGS", "NEEDS_TEACHER", "OBJECTIVES", "SAME_VOCAB_ONLY", "T2S_INIT_FILE", "Objective",
    "ObjectiveOutput", "StudentSide", "TeacherMismatch", "TeacherSide", "build_projectors", "check_compatible",
    "detached_side", "shared_vocabulary", "student_side", "term_grad_norms",
]


class Objective(ObjectiveBase):
    """One objective, configured once per run; call it per micro-batch."""

    def __init__(
        self, cfg: LossConfig, teacher: TeacherSide | None = None, projectors: Projectors | None = None,
        chunk_positions: int = 0,
    ):
        if cfg.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {cfg.objective!r}")
        if NEEDS_TEACHER[cfg.objective] and teacher is None:
            raise ValueError(f"objective {cfg.objective!r} needs the teacher's head (a teacher cache)")
        super().__init__(cfg, teacher, projectors, chunk_positions)

    def __call__(self, batch: Batch, student: StudentSide, normaliser: float) -> ObjectiveOutput:
        """student.hidden holds the N label positions of `batch` (labels != -100, row-major)."""
        labels = batch.labels[batch.labels != -100]
        name = self.cfg.objective
        if not self.chunk:  # automatic: from the largest vocabulary in play (ZeRO-3 keeps out_features when partitioned)
            v = getattr(student.head, "out_features", None) or student.head.weight.shape[0]
            self.chunk = auto_chunk_positions(max(v, self.teacher.head.vocab_size if self.teacher else 0))
        if name == "sft":
            out = chunked(lambda h, y: {"ce": cross_entropy_sum(student.head(h), y)}, len(labels), self.chunk,
                           student.hidden, labels)
            ce = out["ce"] / normaliser  # the whole loss: alpha weighs CE against a KD term, and sft has none
            return ObjectiveOutput(ce, {"ce": ce}, {})
        if name in ("kd", "uld", "mined", "overlap_kd"):
            return student_space_kd(self, batch, student, labels, normaliser)
        if name in ("alm", "alm_eta"):
            return (alm if name == "alm" else alm_eta)(self, batch, student, labels, normaliser)
        if name == "dskd_cma":
            return dskd_cma(self, batch, student, labels, normaliser)
        return dskd(self, batch, student, labels, normaliser)
