"""The objectives, one declaration each. Everything that depends on which objective a run uses is derived from this
table: the config's allowed names (`pipeline/config.py`), the check that a cache can serve it, the projectors and
their initialisation, the run name, and the function the loss dispatches to.

Adding an objective: one `Spec` here, its function in a module of `pipeline/objectives/` with the signature
`fn(ob, batch, student, labels, normaliser) -> ObjectiveOutput`, and its tests.

This module imports nothing heavy (no torch): the config reads it when a YAML file is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Spec:
    name: str
    summary: str  # one line: what it computes
    fn: str  # "module:function" under pipeline.objectives
    teacher: bool = True  # reads a teacher cache (its head, hidden states or top-k)
    vocab: Literal["same", "cross", "any"] = "any"  # the tokenizer pairs it serves: one shared, two different, either
    divergence: bool = True  # compares distributions with loss.divergence (then the default run name carries it)
    projectors: tuple[str, ...] = ()  # trained modules: t2s (teacher -> student space), s2t, query (CMA)
    projector_bias: bool = False  # t2s with a bias (DSKD v1's linear projectors)
    t2s_init: Literal["plain", "logit_identity"] = "plain"  # DSKD v2's fit through both heads, scored by init_t2s
    # where the projected teacher is taught: gold labels (v1), the teacher's argmax (v2), the exact-token pairs'
    # mapped teacher top-1 (ETA); None: no t2s labels (CMA attends instead)
    t2s_labels: Literal["gold", "teacher_argmax", "aligned"] | None = None
    # teacher-side pieces beyond its head and the rows: "embeddings" (cache.store_embeddings), "mined_map" (a
    # minimum-edit-distance map built from both tokenizers when the run starts)
    needs: tuple[str, ...] = ()

    @property
    def s2t_learned(self) -> bool:
        """A trained s2t projector (v1, CMA); otherwise s2t is derived from the two heads (v2, ETA)."""
        return "s2t" in self.projectors


OBJECTIVES: dict[str, Spec] = {s.name: s for s in (
    Spec("sft", "cross-entropy on the labels only (seqkd: sft on teacher-generated responses)",
         "student_space:sft", teacher=False, divergence=False),
    Spec("kd", "D(teacher, student) over the shared vocabulary at every position",
         "student_space:kd", vocab="same"),
    Spec("dskd", "DSKD v1: t2s_kd + t2s_ce (gold labels) + s2t_kd, both projectors trained",
         "dual_space:dskd", vocab="same", projectors=("t2s", "s2t"), projector_bias=True, t2s_labels="gold"),
    Spec("dskd_v2", "DSKD v2: logit-identity t2s, t2s_ce on the teacher's argmax, agreement-masked t2s_kd, s2t from "
         "the heads", "dual_space:dskd", vocab="same", projectors=("t2s",), t2s_init="logit_identity",
         t2s_labels="teacher_argmax"),
    Spec("dskd_eta", "dskd_v2 across vocabularies on the exact-token alignments",
         "dual_space:dskd", vocab="cross", projectors=("t2s",), t2s_init="logit_identity", t2s_labels="aligned"),
    Spec("dskd_cma", "DSKD v1's cross-model attention: student queries attend over the teacher's positions",
         "dual_space:dskd_cma", projectors=("t2s", "s2t", "query"), projector_bias=True, needs=("embeddings",)),
    Spec("uld", "sorted-probability L1 between the i-th response positions of both sides",
         "student_space:uld", divergence=False),
    Spec("mined", "the teacher carried into the student vocabulary by a minimum-edit-distance token map",
         "student_space:mined", vocab="cross", needs=("mined_map",)),
    Spec("overlap_kd", "KD on the shared sub-vocabulary (tokens of one text) at the exactly aligned positions",
         "student_space:overlap_kd", vocab="cross"),
    Spec("alm", "approximate likelihood matching: binarised divergence of the chunk likelihoods",
         "alm:alm", vocab="cross"),
    Spec("alm_eta", "alm plus dskd_eta's dual-space terms",
         "alm:alm_eta", vocab="cross", projectors=("t2s",), t2s_init="logit_identity", t2s_labels="aligned"),
)}
NAMES = tuple(OBJECTIVES)


def spec(name: str) -> Spec:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r} (available: {', '.join(NAMES)})") from None


def run_label(objective: str, divergence: str) -> str:
    """The objective's part of a default run name: the objective, and the divergence when it uses one."""
    return objective + (f"_{divergence}" if spec(objective).divergence else "")


def serving(same_tokenizer: bool) -> list[str]:
    """The distillation objectives a cache of one tokenizer (or of two) can serve."""
    return [s.name for s in OBJECTIVES.values() if s.teacher and s.vocab in ("any", "same" if same_tokenizer else "cross")]


def check_compatible(objective: str, same_tokenizer: bool, has_embeddings: bool, where: str) -> None:
    """A clear error when the cache at `where` cannot serve the objective."""
    s = spec(objective)
    if s.vocab == "same" and not same_tokenizer:
        raise ValueError(f"objective {objective!r} needs the teacher and the student to share a tokenizer; {where}: "
                         f"a cross-tokenizer pair (use {', '.join(serving(False))})")
    if s.vocab == "cross" and same_tokenizer:
        raise ValueError(f"objective {objective!r} is for different tokenizers; {where}: one tokenizer "
                         f"(use {', '.join(serving(True))})")
    if "embeddings" in s.needs and not has_embeddings:
        raise ValueError(f"objective {objective!r} needs the teacher's input embeddings; {where} was built without "
                         "them (rebuild it with cache.store_embeddings: true)")
