"""ZeRO-3: parameters are partitioned across ranks and only whole inside their module's forward. Code that reads a
weight directly (stop-gradient heads, embeddings, saving) gathers it first; without ZeRO-3 these are no-ops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def _partitioned(params: Iterable) -> list:
    return [p for p in params if p is not None and hasattr(p, "ds_id")]


@contextlib.contextmanager
def gathered(params: Iterable) -> Iterator[None]:
    """The full tensors of ZeRO-3-partitioned `params` inside the block, read-only (collective: every rank)."""
    parts = _partitioned(params)
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=None):
        yield


def detached_full(p: torch.Tensor) -> torch.Tensor:
    """`p.detach()`, whole even under ZeRO-3 (then a copy, since the gathered storage is released afterwards)."""
    if not _partitioned([p]):
        return p.detach()
    with gathered([p]):
        return p.detach().clone()
