"""Projectors between the student's and the teacher's hidden spaces, and their initialisation.

Row-vector convention (reference section 5): logits = h @ A with A_S = W_S^T (d_S x V_S), A_T = W_T^T (d_T x V_T).
- dskd (v1) and dskd_cma: t2s (d_T -> d_S) and s2t (d_S -> d_T) are trained nn.Linear with bias and PyTorch's
  default init; CMA adds the query projector (2 d_S -> 2 d_T).
- dskd_v2 / dskd_eta: t2s (no bias) can start at the logit-identity least squares P = A~_T pinv(A~_S) over a shared
  vocabulary U, so h_T P A~_S reproduces the teacher's logits on U as well as any linear map can (through the
  student's head as it is at step 0: objectives/setup.py chooses, `loss.init_t2s`); s2t is not a parameter: each step Q = sg(A~_S) pinv(A~_T) is formed from the current (detached) student head and the teacher
  head's pseudo-inverse, computed once in float32 (the reference stores it in bf16, section 12 #15).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.objectives.table import spec

# the trained projectors beside a run's final/ (and in each checkpoint)
PROJECTORS_FILE = "projectors.safetensors"


def shared_head_columns(
    student_head: torch.Tensor, teacher_head: torch.Tensor, student_ids: torch.Tensor, teacher_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A~_S (d_S x |U|) and A~_T (d_T x |U|) in float32: the head rows (V, d) of the shared vocabulary U, given as
    matching id lists (same vocabulary: U = every id; different: token pairs with the same text, in id order)."""
    return student_head.detach().float()[student_ids].T, teacher_head.detach().float()[teacher_ids].T


def pinv_wide(a: torch.Tensor) -> torch.Tensor:
    """pinv(A) (n x m) of a wide float32 matrix A (m x n, m <= n; here a head's d x |U|), as torch.linalg.pinv
    defines it (singular values below max(m, n) * eps * sigma_max dropped), through the m x m Gram matrix in
    float64: A^T (A A^T)^+. An SVD of the whole (d x |U|) matrix costs 9 s at d = 640, |U| = 46k on 2 cores; this
    takes a third of that, and float64 keeps the squared condition number harmless."""
    a64 = a.double()
    evals, evecs = torch.linalg.eigh(a64 @ a64.T)  # eigenvalues are the squared singular values
    tol = (max(a.shape) * torch.finfo(a.dtype).eps * evals.max().clamp(min=0).sqrt()) ** 2
    inv = torch.where(evals > tol, 1.0 / evals, torch.zeros_like(evals))
    return a.T @ ((evecs * inv) @ evecs.T).to(a.dtype)  # (A A^T)^+ is accurate; the last product needs no float64


def logit_identity_t2s(a_s: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """P = A~_T pinv(A~_S) (d_T x d_S): the minimum-norm least-squares solution of P A~_S = A~_T, in float32."""
    return a_t @ pinv_wide(a_s)


class Projectors(nn.Module):
    """The projector modules of one objective, plus the frozen pieces that derive s2t for dskd_v2 / dskd_eta."""

    def __init__(self, objective: str, d_s: int, d_t: int):
        super().__init__()
        s = spec(objective)  # its modules (table.py); dskd_v2 / dskd_eta derive s2t from the heads instead
        names, bias = s.projectors, s.projector_bias
        if "t2s" in names:
            self.t2s = nn.Linear(d_t, d_s, bias=bias)
        if "s2t" in names:
            self.s2t = nn.Linear(d_s, d_t, bias=True)
        if "query" in names:
            self.query = nn.Linear(2 * d_s, 2 * d_t, bias=True)
        # dskd_v2 / dskd_eta: pinv(A~_T) (|U| x d_T) and the student ids of U, set by `init_logit_identity`. Plain
        # attributes, not buffers: module.to(bfloat16) and mixed-precision engines must not round the pinv
        self.teacher_pinv: torch.Tensor | None = None
        self.student_ids: torch.Tensor | None = None
        self._q: tuple[tuple, torch.Tensor] | None = None  # s2t_matrix's last result, keyed by the head's version
        # how t2s was initialised and why (objectives/setup.build_projectors; <run>/t2s_init.json)
        self.init_report: dict = {}

    def init_logit_identity(
        self, student_head: torch.Tensor, teacher_head: torch.Tensor, student_ids: torch.Tensor, teacher_ids: torch.Tensor,
        *, init_t2s: bool = True,
    ) -> torch.Tensor:
        """Keep pinv(A~_T) for the per-step s2t and return the logit-identity t2s weight P^T (d_S x d_T, float32);
        t2s starts there when `init_t2s` (else it keeps its default initialisation)."""
        a_s, a_t = shared_head_columns(student_head, teacher_head, student_ids, teacher_ids)
        fit = logit_identity_t2s(a_s, a_t).T.contiguous()
        if init_t2s:
            with torch.no_grad():
                self.t2s.weight.copy_(fit.to(self.t2s.weight.dtype))
        self.teacher_pinv = pinv_wide(a_t)  # (|U|, d_T), float32
        self.student_ids = student_ids.long()
        return fit

    def s2t_matrix(self, student_head: torch.Tensor) -> torch.Tensor:
        """Q = sg(A~_S) pinv(A~_T) (d_S x d_T) from the current student head (V_S, d_S)."""
        if self.teacher_pinv is None:
            raise RuntimeError("s2t_matrix needs init_logit_identity first")
        if self.teacher_pinv.device != student_head.device:
            self.teacher_pinv = self.teacher_pinv.to(student_head.device)
            self.student_ids = self.student_ids.to(student_head.device)
        # Q is reused while the head is unchanged (micro-batches of one optimizer step, a frozen head under LoRA)
        # instead of paying |U| x d_S x d_T again; the key catches in-place updates, and the trainer calls
        # `head_updated` after each optimizer step for engines that write weights through `.data`
        key = (student_head.data_ptr(), student_head._version, student_head.shape, student_head.device)
        if self._q is None or self._q[0] != key:
            a_s = student_head.detach().float()[self.student_ids].T
            self._q = (key, a_s @ self.teacher_pinv)
        return self._q[1]

    def head_updated(self) -> None:
        """The student head may have changed: the next s2t_matrix recomputes Q."""
        self._q = None


class ProjectorSet(nn.Module):
    """Several teachers' projectors (`teachers:`), one `Projectors` per teacher whose objective has some, under its
    teacher's name (their state dicts are prefixed with it)."""

    def __init__(self, members: dict[str, Projectors]):
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.init_report = {name: p.init_report for name, p in members.items()}

    def head_updated(self) -> None:
        for p in self.members.values():
            p.head_updated()
