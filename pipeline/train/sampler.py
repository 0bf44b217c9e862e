"""The order in which stage 2 reads rows: a deterministic, endless stream of micro-batches (lists of row indices).

The stream depends only on the row lengths, the micro-batch size and the seed, not on the number of ranks: global
step s (1-based) consumes micro-batches [(s-1)·M, s·M) of it, M = grad_accum × world, and rank r takes the
`grad_accum` consecutive ones starting at (s-1)·M + r·grad_accum. One process with accumulation 2 and two
processes with accumulation 1 therefore see the same micro-batches in every optimizer step, and a resumed run
continues from its position (the number of micro-batches consumed) without replaying the data.

Each epoch is a seeded permutation (seed + epoch) cut into micro-batches; the last partial one is dropped. With
length grouping, the permutation is split into windows of `window` micro-batches, each window is sorted by length
(longest first, ties in permutation order) and cut, and the micro-batches of the epoch are shuffled again, so a
micro-batch holds rows of similar length (less padding) while the order stays random.
"""

from __future__ import annotations

import numpy as np
import torch


class MicroBatchStream:
    def __init__(self, lengths: np.ndarray | list[int], micro_batch_size: int, seed: int, *,
                 group_by_length: bool = True, window: int = 64):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.micro = micro_batch_size
        self.seed = seed
        self.group = group_by_length
        self.window = window
        self.per_epoch = len(self.lengths) // micro_batch_size
        if self.per_epoch < 1:
            raise ValueError(f"{len(self.lengths)} rows cannot fill one micro-batch of {micro_batch_size}")
        self._epoch: tuple[int, list[list[int]]] | None = None

    def epoch(self, e: int) -> list[list[int]]:
        """The micro-batches of epoch e (deterministic for the seed)."""
        g = torch.Generator().manual_seed(self.seed + e)
        order = torch.randperm(len(self.lengths), generator=g).numpy()
        if self.group:
            span = self.micro * self.window
            parts = []
            for start in range(0, len(order), span):
                w = order[start : start + span]
                parts.append(w[np.argsort(-self.lengths[w], kind="stable")])
            order = np.concatenate(parts)
        batches = [order[i * self.micro : (i + 1) * self.micro].tolist() for i in range(self.per_epoch)]
        if self.group:  # sorted windows would otherwise put the longest micro-batches first in every window
            shuffle = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in shuffle]
        return batches

    def __getitem__(self, k: int) -> list[int]:
        """The k-th micro-batch of the endless stream (0-based)."""
        e, i = divmod(k, self.per_epoch)
        if self._epoch is None or self._epoch[0] != e:
            self._epoch = (e, self.epoch(e))
        return self._epoch[1][i]

    def for_step(self, step: int, rank: int, world_size: int, grad_accum: int) -> list[list[int]]:
        """Rank `rank`'s micro-batches in optimizer step `step` (1-based)."""
        first = (step - 1) * grad_accum * world_size + rank * grad_accum
        return [self[first + a] for a in range(grad_accum)]


def eval_batches(lengths: np.ndarray | list[int], micro_batch_size: int) -> list[list[int]]:
    """Every row exactly once, in micro-batches of similar length (validation: order does not matter)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + micro_batch_size].tolist() for i in range(0, len(order), micro_batch_size)]
