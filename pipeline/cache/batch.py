"""Typed batches for stage 2, collated from cache rows or from tokenized examples.

Student tensors are right-padded; labels are -100 outside the response. Teacher per-position tensors are the
concatenation, row by row, of the cached response positions, so for a shared tokenizer they line up one-to-one
with `labels != -100` in row-major order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache.store import CacheRow
from pipeline.data.tokenize import Encoded, pad, response_positions


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, -100 = no loss
    ids: list[str]
    # teacher side, present when the batch comes from a cache
    teacher_hidden: torch.Tensor | None = None  # (N, d_T)
    teacher_topk_ids: torch.Tensor | None = None  # (N, k) int32
    teacher_topk_logits: torch.Tensor | None = None  # (N, k) float32
    teacher_lse: torch.Tensor | None = None  # (N,) float32
    teacher_inputs: torch.Tensor | None = None  # (N,) long: the teacher's input token at each cached position
    teacher_labels: torch.Tensor | None = None  # (N,) long: the teacher's next (gold) token there
    teacher_row: torch.Tensor | None = None  # (N,) long: which example of the batch each cached position belongs to
    # cross-tokenizer caches: aligned pairs as indices into the student's label positions (row-major, as
    # `labels != -100`) and into the cached teacher positions, and the student id of the teacher's top-1 (-100: none)
    align_student: torch.Tensor | None = None  # (K,) long
    align_teacher: torch.Tensor | None = None  # (K,) long
    align_label: torch.Tensor | None = None  # (K,) long
    teacher_target_logprob: torch.Tensor | None = None  # (N,) float32: log p_T of the teacher's own next token
    # chunks (cross-tokenizer caches): the chunk of each student label position / cached teacher position, numbered
    # over the batch, -1 outside every chunk (truncation); n_chunks chunks in all
    chunk_student: torch.Tensor | None = None  # (N_S,) long
    chunk_teacher: torch.Tensor | None = None  # (N,) long
    n_chunks: int = 0
    # several teachers (`teachers:`): the same rows collated from each further teacher's cache (the student tensors
    # equal, the teacher side that teacher's); this batch is the first teacher's
    others: list[Batch] | None = None

    @property
    def n_tokens(self) -> int:
        """Loss tokens in this micro-batch (student labels that are not -100)."""
        return int((self.labels != -100).sum())

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        if self.others is not None:
            moved["others"] = [o.to(device) for o in self.others]
        return Batch(**moved)


def _student_tensors(seqs: list, starts: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs, mask = pad([list(s[:-1]) for s in seqs], pad_id)
    labels = torch.full_like(inputs, -100)
    for b, (s, rs) in enumerate(zip(seqs, starts)):
        span = response_positions(len(s), rs)
        labels[b, span.start : span.stop] = torch.tensor(s[rs:], dtype=torch.long)
    return inputs, mask, labels


def collate_examples(items: list[tuple[str, Encoded]], pad_id: int) -> Batch:
    inputs, mask, labels = _student_tensors([e.ids for _, e in items], [e.response_start for _, e in items], pad_id)
    return Batch(inputs, mask, labels, ids=[i for i, _ in items])


def collate_cache_rows(rows: list[CacheRow], pad_id: int) -> Batch:
    seqs = [r.student_ids for r in rows]
    inputs, mask, labels = _student_tensors(seqs, [r.student_response_start for r in rows], pad_id)
    t_inputs, t_labels, t_row, a_s, a_t, a_l, c_s, c_t = [], [], [], [], [], [], [], []
    s_off = t_off = c_off = 0
    for b, r in enumerate(rows):
        span = response_positions(len(r.teacher_ids), r.teacher_response_start)
        n_s = len(r.student_ids) - r.student_response_start
        t_inputs.append(r.teacher_ids[span.start : span.stop])
        t_labels.append(r.teacher_ids[span.start + 1 : span.stop + 1])
        t_row.append(np.full(len(span), b))
        if r.align_student is not None:  # label positions -> offsets into the flattened positions of the batch
            a_s.append(r.align_student.astype(np.int64) - (r.student_response_start - 1) + s_off)
            a_t.append(r.align_teacher.astype(np.int64) - span.start + t_off)
            a_l.append(r.align_label)
            c_s.append(_chunk_of_position(r.chunks[:, :2] - (r.student_response_start - 1), n_s, c_off))
            c_t.append(_chunk_of_position(r.chunks[:, 2:] - span.start, len(span), c_off))
            c_off += len(r.chunks)
        s_off += n_s
        t_off += len(span)
    aligned = rows[0].align_student is not None

    def cat(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    return Batch(
        inputs,
        mask,
        labels,
        ids=[r.id for r in rows],
        teacher_hidden=torch.cat([r.hidden for r in rows]),
        teacher_topk_ids=torch.cat([r.topk_ids for r in rows]),
        teacher_topk_logits=torch.cat([r.topk_logits for r in rows]),
        teacher_lse=torch.cat([r.lse for r in rows]),
        teacher_inputs=cat(t_inputs),
        teacher_labels=cat(t_labels),
        teacher_row=cat(t_row),
        align_student=cat(a_s) if aligned else None,
        align_teacher=cat(a_t) if aligned else None,
        align_label=cat(a_l) if aligned else None,
        teacher_target_logprob=torch.cat([r.target_logprob for r in rows]),
        chunk_student=cat(c_s) if aligned else None,
        chunk_teacher=cat(c_t) if aligned else None,
        n_chunks=c_off,
    )


def _chunk_of_position(ranges: np.ndarray, n: int, first: int) -> np.ndarray:
    """(n,) chunk number (from `first`) of each of n positions, -1 outside; ranges (C, 2) half-open, in order."""
    out = np.full(n, -1, dtype=np.int64)
    lengths = ranges[:, 1] - ranges[:, 0]
    if len(ranges):
        pos = np.repeat(ranges[:, 0] - np.cumsum(np.r_[0, lengths[:-1]]), lengths) + np.arange(lengths.sum())
        out[pos] = np.repeat(np.arange(first, first + len(ranges)), lengths)
    return out
