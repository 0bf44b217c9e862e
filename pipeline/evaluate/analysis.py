"""The DSKD paper's representation analysis (section 5.3 / appendix E): how alike the *structure* of teacher and
student hidden states is, where the two live in spaces of different sizes.

For one sequence with hidden states H (n positions x d), two structure matrices (n x n):
- cosine: C_ij = cos(h_i, h_j);
- normalised inner product: G_ij = <h_i, h_j> / mean_k <h_k, h_k> (scale-free, keeps the relative norms).
The distance between teacher and student is the mean absolute difference of their matrices (L1 per entry),
averaged over sequences. Positions are the response's label positions, the teacher's from the cache (its last
hidden states after the final norm) and the student's from a forward pass; with a shared tokenizer they pair one to
one, across tokenizers only the exactly aligned pairs the cache stores are used. The paper's exact normalisation of
the inner product could not be retrieved here; this one is documented and tested (0 for a model against itself,
growing with a perturbation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.tokenize import response_positions
from pipeline.evaluate.suites import resolve_run
from pipeline.models.load import decoder_hidden
from pipeline.objectives.dual_space import t2s_positions

EPS = 1e-12


def structure_matrices(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine, normalised inner product) of the rows of `h` (n, d), in float64."""
    h = h.double()
    unit = h / h.norm(dim=-1, keepdim=True).clamp_min(EPS)
    gram = h @ h.T
    return unit @ unit.T, gram / gram.diagonal().mean().clamp_min(EPS)


def structure_distance(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean |difference| of the two structure matrices of `a` (n, d_a) and `b` (n, d_b): same positions, any widths."""
    ca, ia = structure_matrices(a)
    cb, ib = structure_matrices(b)
    return {"cosine_l1": float((ca - cb).abs().mean()), "inner_l1": float((ia - ib).abs().mean())}


def paired_positions(row) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the student's and the teacher's response positions that hold the same token's prediction."""

    s_span = response_positions(len(row.student_ids), row.student_response_start)
    t_span = response_positions(len(row.teacher_ids), row.teacher_response_start)
    if row.align_student is not None:
        return (row.align_student.astype(np.int64) - s_span.start, row.align_teacher.astype(np.int64) - t_span.start)
    n = s_span.stop - s_span.start
    if n != len(row.hidden):
        raise ValueError(f"cache row {row.id}: {n} student response positions but {len(row.hidden)} teacher ones")
    return np.arange(n), np.arange(n)


@torch.no_grad()
def student_hidden(model, row) -> torch.Tensor:
    """The student's last hidden states (after the final norm) at its response positions."""

    ids = torch.tensor(np.asarray(row.student_ids, dtype=np.int64))[None]
    h = decoder_hidden(model, ids, torch.ones_like(ids))[0]
    span = response_positions(len(row.student_ids), row.student_response_start)
    return h[span.start : span.stop].float()


def representation_distance(model, rows: list) -> dict:
    """Mean structure distances between `model` and the cached teacher over `rows` (sequences with fewer than two
    paired positions are skipped)."""
    sums, used, positions = {"cosine_l1": 0.0, "inner_l1": 0.0}, 0, 0
    for row in rows:
        s_idx, t_idx = paired_positions(row)
        if len(s_idx) < 2:
            continue
        d = structure_distance(student_hidden(model, row)[s_idx], row.hidden.float()[t_idx])
        for k in sums:
            sums[k] += d[k]
        used += 1
        positions += len(s_idx)
    if not used:
        raise ValueError("no cache row has two or more paired response positions")
    return {**{k: v / used for k, v in sums.items()}, "rows": used, "positions": positions}


# answer positions reported one by one; later ones are pooled
AGREEMENT_POSITIONS = 8


@torch.no_grad()
def t2s_agreement_by_position(model, projectors, objective: str, batches: list) -> dict[str, float]:
    """The projected teacher's agreement with its t2s labels (argmax of t2s(h_T) through the student's head == the
    label) by position in the response: "0" is the first response token, ..., and "8+" the rest. Positions are
    those `t2s_positions` trains (every label position, or the exact-token pairs with a label across tokenizers);
    `batches` are cache batches (`batch.collate_cache_rows`)."""

    head = model.get_output_embeddings()
    agree: dict[str, list[float]] = {}
    for batch in batches:
        mask = batch.labels != -100
        labels = batch.labels[mask]
        s_rows, t_rows, y = t2s_positions(objective, batch, labels)
        where = torch.nonzero(mask)
        first = torch.full((mask.shape[0],), mask.shape[1], dtype=torch.long).scatter_reduce(
            0, where[:, 0], where[:, 1], "amin")
        pos = (where[:, 1] - first[where[:, 0]])[s_rows]
        z = head(projectors.t2s(batch.teacher_hidden[t_rows].float().to(projectors.t2s.weight.dtype)).to(head.weight.dtype))
        hit = (z.argmax(-1) == y).float()
        for p, h in zip(pos.tolist(), hit.tolist()):
            agree.setdefault(str(p) if p < AGREEMENT_POSITIONS else f"{AGREEMENT_POSITIONS}+", []).append(h)
    keys = sorted(agree, key=lambda k: int(k.rstrip("+")))
    return {k: sum(agree[k]) / len(agree[k]) for k in keys}


def plot_structures(teacher: torch.Tensor, students: dict[str, torch.Tensor], path, title: str):
    """Heat maps of the cosine structure matrix of one sequence: the teacher's and each student's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = {"teacher": teacher, **students}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (name, h) in zip(axes[0], panels.items()):
        cos, _ = structure_matrices(h)
        im = ax.imshow(cos.numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        extra = "" if name == "teacher" else f"\nL1 to teacher {structure_distance(h, teacher)['cosine_l1']:.3f}"
        ax.set_title(f"{name}{extra}", fontsize=9)
        ax.set_xlabel("response position")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("response position")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cosine similarity")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


RESULT = "representation.json"  # a run's analysis, in its analysis_dir


def analysis_dir(entry: str) -> Path:
    r = resolve_run(entry)
    return r.eval_dir.parent / "analysis"
