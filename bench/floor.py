"""FLOP floors of stage-2 objectives: the matrix products an objective cannot avoid, per optimizer step.

A floor counts multiply-adds as 2 FLOPs and a backward pass as what the gradients need: a product whose weight
trains costs forward + input gradient + weight gradient (3x its forward), one whose input alone needs a gradient
(a frozen head applied to a trainable projection) 2x, a constant one (the teacher head on cached hidden states) 1x.
Element-wise work (softmax, divergences, sorting) and padding are not in it: they are what an implementation can
shrink. `sft` is the student's body over every input token (6 x its matrix parameters, plus causal attention) and
its head at label positions only; every objective is `sft` plus its own products:

| objective | extra products per step |
|---|---|
| kd (dense teacher) | teacher head at teacher positions (1x) |
| kd (sparse teacher) | none |
| uld, mined, overlap_kd | teacher head at teacher positions (uld) or aligned pairs (1x) |
| alm | none (the teacher's chunk likelihoods are cached) |
| dskd_v2 / dskd_eta / alm_eta | teacher head target (1x); t2s projection (fwd + weight grad) and the student head on it (2x, the head stop-gradient); s2t projection and the teacher head on it (2x); once per step Q = A_S pinv(A_T) over the shared ids |
| dskd_cma | query / value projections, per-example attention both ways, both heads as in dskd, the teacher target |
| kd online | kd plus the teacher's own forward over its tokens (what an offline cache saves) |

`measured / floor` below is (objective time / sft time) / (objective floor / sft floor): 1.00 means the objective
costs exactly its unavoidable extra products relative to sft, whatever share of the step the vocabulary takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Dims:
    d_s: int
    d_t: int
    v_s: int
    v_t: int
    body_s: int  # matrix parameters of the student's decoder layers (embeddings and head excluded)
    layers_s: int
    attn_s: int  # query width (heads x head_dim) of the student
    body_t: int = 0  # the teacher's, for `kd online`
    layers_t: int = 0
    attn_t: int = 0
    shared: int = 0  # ids with a same-text token on both sides (dskd_v2 / dskd_eta's Q); V when the vocabulary is one


@dataclass
class Counts:
    """Per optimizer step (the sums over its micro-batches' rows)."""

    tokens_s: float  # student input tokens
    sq_s: float  # sum over rows of (student input length)^2, for attention
    labels: float  # student label positions
    teacher: float  # teacher label positions
    pairs: float  # aligned (student, teacher) position pairs (cross-tokenizer caches; = labels on one vocabulary)
    cross: float = 0.0  # sum over rows of student labels x teacher positions (dskd_cma's attention)
    tokens_t: float = 0.0
    sq_t: float = 0.0


def body(params: int, layers: int, attn: int, tokens: float, sq: float, passes: int) -> float:
    """A decoder's body: 2 FLOPs per matrix parameter per token per pass, causal attention (QK^T and AV over half
    the square)."""
    return passes * (2 * params * tokens + 2 * layers * attn * sq)


def floor(objective: str, d: Dims, c: Counts, dense: bool = True) -> float:
    hs, ht, pj = 2 * d.d_s * d.v_s, 2 * d.d_t * d.v_t, 2 * d.d_s * d.d_t
    base = body(d.body_s, d.layers_s, d.attn_s, c.tokens_s, c.sq_s, 3) + 3 * hs * c.labels
    if objective == "sft":
        return base
    if objective in ("kd", "kd online"):
        extra = ht * c.teacher if dense else 0.0
        if objective == "kd online":
            extra += body(d.body_t, d.layers_t, d.attn_t, c.tokens_t, c.sq_t, 1)
        return base + extra
    if objective == "uld":
        return base + ht * c.teacher
    if objective in ("mined", "overlap_kd"):
        return base + ht * c.pairs
    if objective == "alm":
        return base
    if objective in ("dskd_v2", "dskd_eta", "alm_eta", "dskd"):
        n = c.pairs
        per = ht + 2 * pj + 2 * hs + 2 * pj + 2 * ht
        q = 2 * d.shared * d.d_s * d.d_t if objective != "dskd" else 0.0
        return base + per * n + q
    if objective == "dskd_cma":
        proj = 2 * pj * c.teacher + 2 * (4 * pj) * c.labels + 3 * pj * c.labels  # value_t, query, value_s
        attn = (8 * d.d_t + 6 * d.d_s + 6 * d.d_t) * c.cross
        heads = 2 * hs * c.labels + 2 * ht * c.teacher + ht * c.teacher
        return base + proj + attn + heads
    raise ValueError(f"no floor for objective {objective!r}")


def head_share(d: Dims, c: Counts) -> float:
    """The student head's share of sft's floor (how vocabulary-dominated the student is)."""
    return 3 * 2 * d.d_s * d.v_s * c.labels / floor("sft", d, c)


def dims_of(student_config, teacher_config, shared: int) -> Dims:
    """Dims from two transformers configs (models built on the meta device: no weights are read)."""
    s, t = _model_dims(student_config), _model_dims(teacher_config)
    return Dims(d_s=s["d"], d_t=t["d"], v_s=s["v"], v_t=t["v"], body_s=s["body"], layers_s=s["layers"],
                attn_s=s["attn"], body_t=t["body"], layers_t=t["layers"], attn_t=t["attn"], shared=shared)


def _model_dims(config) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.models.prune import layer_stack

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    stack = model.get_submodule(layer_stack(model))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {"d": text.hidden_size, "v": model.get_output_embeddings().weight.shape[0],
            "body": sum(p.numel() for p in stack.parameters() if p.dim() == 2), "layers": len(stack),
            "attn": heads * head_dim}


def counts_of(rows: list, micro_batch: int) -> Counts:
    """Mean per-step counts over cache rows (micro-batches are drawn uniformly from them): `micro_batch` x the mean
    per row."""
    n_s = np.array([len(r.student_ids) - 1 for r in rows], dtype=float)
    n_t = np.array([len(r.teacher_ids) - 1 for r in rows], dtype=float)
    lab = np.array([len(r.student_ids) - r.student_response_start for r in rows], dtype=float)
    tea = np.array([len(r.teacher_ids) - r.teacher_response_start for r in rows], dtype=float)
    pairs = np.array([lab_i if r.align_label is None else float((r.align_label != -100).sum())
                      for r, lab_i in zip(rows, lab)])
    k = micro_batch
    return Counts(tokens_s=k * n_s.mean(), sq_s=k * (n_s**2).mean(), labels=k * lab.mean(), teacher=k * tea.mean(),
                  pairs=k * pairs.mean(), cross=k * (lab * tea).mean(), tokens_t=k * n_t.mean(),
                  sq_t=k * (n_t**2).mean())
