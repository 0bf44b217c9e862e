"""Stage 2's engine: the module DeepSpeed trains (the student and the objective's projectors), the DeepSpeed config
filled from the run's settings, the optimizer's parameter groups, the learning-rate schedule and the optimizer."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.models.load import decoder_hidden


class StudentWithProjectors(torch.nn.Module):
    """What stage 2 trains, as one module for the engine: the student and the objective's projectors."""

    def __init__(self, student, projectors=None):
        super().__init__()
        self.student = student
        self.projectors = projectors

    def forward(self, input_ids, attention_mask):
        return decoder_hidden(self.student, input_ids, attention_mask)


def deepspeed_config(train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON template with batch, accumulation, clipping and precision filled from the run config. The
    global batch is micro_batch_size x grad_accum whatever the number of processes: each takes grad_accum / world
    of the accumulation."""
    path = Path(train.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.deepspeed: {path} not found (templates: configs/deepspeed/*.json)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed: {path} is not JSON ({e})") from None
    ds.update(
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum // world_size,
        train_batch_size=train.micro_batch_size * train.grad_accum,
        gradient_clipping=train.grad_clip,
        steps_per_print=10**9,
    )
    ds["bf16"] = {"enabled": train.precision == "bf16"}
    ds["fp16"] = {"enabled": train.precision == "fp16"}
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads(ds: dict) -> bool:
    z = ds.get("zero_optimization", {})
    return any(z.get(k, {}).get("device", "none") not in ("none", None) for k in ("offload_optimizer", "offload_param"))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only, not on biases and norm weights (1-D); frozen parameters are left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # LoRA: adapters only, all matrices (an empty group breaks schedulers)


def optimizer_groups(student: torch.nn.Module, projectors, train: TrainConfig) -> list[dict]:
    """The student's groups at `lr`, and the projectors' in their own group at `projector_lr` (by default `lr`: the
    DSKD v2 reference trains both at 5e-4; a projector slower than the head it projects through cannot follow it,
    measured on the tiny default: dskd_v2 at 3e-3 / 1e-3 reached 34.6 exact match, at 3e-3 / 3e-3 75.0)."""
    groups = [{**g, "lr": train.lr} for g in param_groups(student, train.weight_decay)]
    if projectors is not None:
        lr = train.lr if train.projector_lr is None else train.projector_lr
        groups.append({"params": list(projectors.parameters()), "lr": lr, "weight_decay": train.weight_decay})
    return groups


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine or linear decay from lr to min_lr over the remaining steps, or constant (a factor
    of each group's lr, so the projectors follow the same shape). A run may start `step_offset` steps into a
    schedule of `schedule_steps`."""

    total = train.schedule_steps or train.steps

    def f(step: int) -> float:
        step += train.step_offset  # a run that continues a longer one (on-policy rounds)
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.schedule == "constant":
            return 1.0
        progress = min((step - train.warmup_steps) / max(1, total - train.warmup_steps), 1.0)
        floor = train.min_lr / train.lr
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if train.schedule == "cosine" else 1.0 - progress
        return floor + (1 - floor) * shape

    return f


def make_optimizer(groups: list[dict], tcfg: TrainConfig, ds: dict):
    """AdamW; DeepSpeed's CPU Adam when ZeRO offloads the optimizer from a GPU (torch's on a CPU-only machine,
    where the states are on the CPU anyway and the JIT-built op would only add start-up time)."""
    if offloads(ds) and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), adamw_mode=True)
    ds["zero_force_ds_cpu_optimizer"] = False
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas))
