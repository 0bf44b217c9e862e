"""Where stage-2 metrics go: <run>/metrics.jsonl always, TensorBoard and/or Weights & Biases when asked for.

A resumed run keeps the rows up to its checkpoint's step and appends after them, so metrics.jsonl reads as one
uninterrupted run. `peak_memory_mb` is what the rows report as peak memory.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.io_utils import atomic_write_text


def peak_rss_mb() -> float:
    """Peak resident memory of this process's own address space: Linux's VmHWM. Not getrusage's ru_maxrss, which
    also counts the parent's memory that a spawned process carried until its exec (a stage launched from a test or
    bench process that holds models would report theirs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (CPU) and, on GPU, the peak allocated by torch on the device."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


_SINK_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_sinks(report_to: list[str]) -> None:
    """Every asked-for metric sink has its package (checked before a run directory is made)."""
    import importlib.util

    for sink in report_to:
        if importlib.util.find_spec(_SINK_PACKAGES[sink]) is None:
            raise ConfigError(f"train.report_to: {sink} needs the `{_SINK_PACKAGES[sink]}` package "
                              f"(pip install {_SINK_PACKAGES[sink]})")


class MetricsLog:
    def __init__(self, run_dir: Path, run_name: str, config: dict, report_to: list[str], resume_step: int | None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        self.tb = self.wandb = None
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.report_to: tensorboard needs the `tensorboard` package (pip install tensorboard)") from None
            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ConfigError("train.report_to: wandb needs the `wandb` package (pip install wandb)") from None
            self.wandb = wandb.init(project="dskd", name=run_name, config=config, dir=str(run_dir), resume="allow")
        self.file = open(self.path, "a")  # last: a sink that fails leaves no empty metrics file

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row["step"]
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k.replace("valid_", "valid/", 1) if k.startswith("valid_") else f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
