"""Typed batches for stage 2, collated from cache rows or from tokenized examples.

Student tensors are right-padded; labels are -100 outside the response. Teacher per-position tensors are the
concatenation, row by row, of the cached response positions, so for a shared tokenizer they line up one-to-one
with `labels != -100` in row-major order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.cache_io import CacheRow
from pipeline.tokenize import Encoded, pad, response_positions


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

    @property
    def n_tokens(self) -> int:
        """Loss tokens in this micro-batch (student labels that are not -100)."""
        return int((self.labels != -100).sum())

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
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
    return Batch(
        inputs,
        mask,
        labels,
        ids=[r.id for r in rows],
        teacher_hidden=torch.cat([r.hidden for r in rows]),
        teacher_topk_ids=torch.cat([r.topk_ids for r in rows]),
        teacher_topk_logits=torch.cat([r.topk_logits for r in rows]),
        teacher_lse=torch.cat([r.lse for r in rows]),
    )
