"""The configured objective: `Objective(cfg.loss, teacher, projectors)(batch, student, normaliser)` calls the function
its entry in `table.py` names; `Ensemble` sums several teachers' objectives."""

from __future__ import annotations

import importlib

from pipeline.cache.batch import Batch
from pipeline.config import LossConfig
from pipeline.losses import auto_chunk_positions
from pipeline.objectives.base import ObjectiveBase, ObjectiveOutput, StudentSide, TeacherSide
from pipeline.objectives.projectors import Projectors


def function(fn: str):
    """The function "module:function" of a table entry names, from pipeline/objectives/<module>.py."""
    module, name = fn.split(":")
    return getattr(importlib.import_module(f"pipeline.objectives.{module}"), name)


class Objective(ObjectiveBase):
    """One objective, configured once per run; call it per micro-batch."""

    def __init__(
        self, cfg: LossConfig, teacher: TeacherSide | None = None, projectors: Projectors | None = None,
        chunk_positions: int = 0,
    ):
        super().__init__(cfg, teacher, projectors, chunk_positions)
        if self.spec.teacher and teacher is None:
            raise ValueError(f"objective {cfg.objective!r} needs the teacher's head (a teacher cache)")
        self.fn = function(self.spec.fn)

    def __call__(self, batch: Batch, student: StudentSide, normaliser: float, ce_weight: float = 1.0) -> ObjectiveOutput:
        """student.hidden holds the N label positions of `batch` (labels != -100, row-major). The loss is
        (1 - alpha) * ce_weight * CE + alpha * KD (ce_weight: on-policy mixes weigh the gold CE apart; sft: CE)."""
        self.ce_weight = ce_weight
        labels = batch.labels[batch.labels != -100]
        if not self.chunk:  # automatic: from the largest vocabulary in play (ZeRO-3 keeps out_features when partitioned)
            v = getattr(student.head, "out_features", None) or student.head.weight.shape[0]
            self.chunk = auto_chunk_positions(max(v, self.teacher.head.vocab_size if self.teacher else 0))
        return self.fn(self, batch, student, labels, normaliser)


class Ensemble:
    """Several teachers' objectives as one (`teachers:`): loss = (1 - alpha) CE + alpha * sum_i w_i KD_i. The first
    teacher's objective carries the CE; each further teacher's runs on its own collation of the same rows
    (`Batch.others`) with CE weight 0. Terms and statistics are reported per teacher as `<name>.<term>`, beside
    `ce` and the weighted `kd`."""

    def __init__(self, objectives: list[Objective], weights: list[float], names: list[str]):
        self.objectives, self.weights, self.names = objectives, weights, names
        for ob, w in zip(objectives, weights):
            ob.kd_weight = w

    def __call__(self, batch: Batch, student: StudentSide, normaliser: float, ce_weight: float = 1.0) -> ObjectiveOutput:
        if batch.others is None or len(batch.others) != len(self.objectives) - 1:
            raise ValueError(f"{len(self.objectives)} teachers, but the batch holds {1 + len(batch.others or [])} "
                             "teachers' rows")
        outs = [ob(b, student, normaliser, ce_weight if i == 0 else 0.0)
                for i, (ob, b) in enumerate(zip(self.objectives, [batch, *batch.others]))]
        terms = {"ce": outs[0].terms["ce"], "kd": sum(w * o.terms["kd"] for w, o in zip(self.weights, outs))}
        stats = {}
        for name, o in zip(self.names, outs):
            terms.update({f"{name}.{k}": v for k, v in o.terms.items() if k != "ce"})
            stats.update({f"{name}.{k}": v for k, v in o.stats.items()})
        return ObjectiveOutput(sum(o.loss for o in outs), terms, stats)
