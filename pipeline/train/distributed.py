"""Process-group setup for DeepSpeed, with or without a launcher.

Launched by `deepspeed`/`torchrun`, the rank variables are already set. Run as a plain process, this sets the
single-process defaults (rank 0 of 1, a free local port) so the same code path runs everywhere. CPU uses gloo.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank_world() -> tuple[int, int]:
    """(rank, world size) as a launcher (torchrun, deepspeed) set them, before any process group exists."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    import deepspeed
    import torch.distributed as dist

    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        added = [k for k in [*defaults, "MASTER_PORT"] if k not in os.environ]
        os.environ.update({k: defaults.get(k) or str(_free_port()) for k in added})
        try:
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        finally:  # this group's rendezvous port is in use now: a child process must not inherit it
            for k in ("MASTER_ADDR", "MASTER_PORT"):
                if k in added:
                    os.environ.pop(k)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if values and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def local_or_distributed() -> DistInfo:
    """A process group when a launcher started several processes (torchrun / deepspeed set WORLD_SIZE > 1);
    otherwise rank 0 of 1 on the local device, without the cost of a process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed()
    return DistInfo(0, 0, 1, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
