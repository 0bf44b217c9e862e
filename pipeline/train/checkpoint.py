"""Resumable stage-2 checkpoints: <run>/checkpoints/step-NNNNNNN/, complete or absent.

A checkpoint holds
- `student/`: the student as saved by `save_pretrained` (full weights, or the LoRA adapter), with its tokenizer;
- `projectors.safetensors` (DSKD objectives);
- `engine/`: DeepSpeed's own checkpoint: module, optimizer (each rank's ZeRO partition), LR scheduler;
- `rng-rank<r>.pt`: each rank's Python, NumPy, torch (and CUDA) generator states;
- `state.json` (written last): step, data position, metrics, the run's fingerprint.
Everything is written under a hidden temporary directory, fsynced, and renamed into place: the rename is the commit.
A run killed while saving, or a full disk, leaves the previous checkpoint untouched (the temporary is removed on
error, and by the next save or resume after a kill). The newest complete checkpoint is the one a resume loads; the
best `keep_best` by a validation metric are kept besides it and older ones are deleted.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelRef
from pipeline.io_utils import save_pretrained, write_json
from pipeline.models.lora import save_adapter
from pipeline.train.distributed import DistInfo, all_reduce_sum, barrier

CHECKPOINTS = "checkpoints"
STATE = "state.json"
ENGINE_TAG = "engine"
_STEP = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names it. Earlier checkpoints are intact."""


class TrainingDiverged(RuntimeError):
    """A loss or the weights became NaN/inf; the message names the step and the term. Nothing was saved after it."""


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def complete(run_dir: Path) -> list[tuple[int, Path]]:
    """The committed checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.fullmatch(p.name)) and (p / STATE).is_file()]
    return sorted(found)


def latest(run_dir: Path) -> Path | None:
    found = complete(run_dir)
    return found[-1][1] if found else None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE).read_text())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "disk full"
    return f"{type(e).__name__}: {e}"


def commit(final: Path, tmp: Path, stale: str, dist: DistInfo, write: Callable[[Path], Path | None], what: str,
           intact: str) -> Path:
    """Write a directory whole or not at all (collective: every rank calls it). Rank 0 removes what a killed writer
    left beside `final` (the names matching `stale`) and creates `tmp`; every rank runs `write(tmp)` (ZeRO-3 gathers
    are collective), which may return another directory to commit instead (a merged copy); if any rank failed, the
    temporaries are removed and CheckpointError says what was being written and that `intact` still holds;
    otherwise rank 0 replaces `final` with it: the rename is the commit."""
    if dist.is_main:
        for left in final.parent.glob(stale):
            shutil.rmtree(left, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    error: BaseException | None = None
    done = tmp
    try:
        done = write(tmp) or tmp
    except Exception as e:  # a full disk, a quota, a model that cannot be serialized: keep what was there
        error = e
    (failed,) = all_reduce_sum([float(error is not None)], dist.device)
    if failed:
        if dist.is_main:
            for left in final.parent.glob(stale):
                shutil.rmtree(left, ignore_errors=True)
        barrier()
        why = _reason(error) if error is not None else "another rank failed to write its part"
        fix = "free space, then re-run with --resume" if isinstance(error, OSError) or error is None else \
            "fix the cause, then re-run with --resume"
        raise CheckpointError(f"writing {what} {final}: {why}; nothing was committed and {intact} ({fix})") from error
    if dist.is_main:
        if final.exists():  # the same step saved again (a resumed run that repeated it): replace it whole
            shutil.rmtree(final)
        os.replace(done, final)  # the commit
    barrier()
    return final


def save(engine, run_dir: Path, step: int, state: dict, dist: DistInfo, write_student: Callable[[Path], None],
         *, exclude_frozen: bool = False) -> Path:
    """Write checkpoint `step` (collective: every rank calls it). `write_student(dir)` writes the student and
    projectors into dir; it runs on every rank (ZeRO-3 gathers are collective) and writes on rank 0."""
    final = Path(run_dir) / CHECKPOINTS / step_name(step)

    def write(tmp: Path) -> None:
        engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=exclude_frozen)
        torch.save(rng_state(), tmp / f"rng-rank{dist.rank}.pt")
        write_student(tmp)
        if dist.is_main:
            write_json(tmp / STATE, {**state, "step": step, "world_size": dist.world_size})
            _fsync_tree(tmp)

    return commit(final, final.parent / f".tmp-{final.name}", ".tmp-*", dist, write, "checkpoint",
                  "the previous checkpoint is intact")


def save_student(model, path: Path, tokenizer, base: ModelRef) -> None:
    """The student with its tokenizer: full weights (HF format) or, for a LoRA student, the adapter."""
    if hasattr(model, "peft_config"):
        save_adapter(model, path, base)
    else:
        save_pretrained(model, path)
    tokenizer.save_pretrained(path)


def check_finite_weights(module: torch.nn.Module, step: int, dist: DistInfo) -> None:
    """Refuse to save non-finite weights (each rank checks its ZeRO-3 partition or the whole tensors)."""
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(getattr(p, "ds_tensor", p)).all()]
    (n_bad,) = all_reduce_sum([len(bad)], dist.device)
    if n_bad:
        raise TrainingDiverged(f"step {step}: non-finite weights ({bad[:3]}) after the optimizer step; nothing was "
                               "saved for this step (lower train.lr or check the data)")


def load(engine, ckpt: Path, dist: DistInfo, *, strict: bool = True) -> dict:
    """Restore engine (module, optimizer, scheduler) and this rank's RNG from `ckpt`; return its state.json."""
    state = read_state(ckpt)
    if state["world_size"] != dist.world_size:
        raise CheckpointError(f"{ckpt}: saved by {state['world_size']} rank(s), this run has {dist.world_size}; "
                              "resume with the same number of processes")
    rng = ckpt / f"rng-rank{dist.rank}.pt"
    if not rng.is_file():
        raise CheckpointError(f"{rng}: missing")
    path, _ = engine.load_checkpoint(str(ckpt), tag=ENGINE_TAG, load_module_strict=strict)
    if path is None:
        raise CheckpointError(f"{ckpt / ENGINE_TAG}: DeepSpeed could not load it")
    set_rng_state(torch.load(rng, weights_only=False))
    return state


def load_weights_and_optimizer(engine, ckpt: Path, *, strict: bool = True) -> None:
    """Restore the module and optimizer state of `ckpt` into a new run (not its scheduler or RNG): continuing a
    longer run in pieces (on-policy rounds) with the AdamW moments it had."""
    path, _ = engine.load_checkpoint(str(ckpt), tag=ENGINE_TAG, load_module_strict=strict, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"{ckpt / ENGINE_TAG}: DeepSpeed could not load it")


def prune(run_dir: Path, keep_best: int, metric: str) -> list[Path]:
    """Delete checkpoints other than the newest and the `keep_best` best by `metric` (lower is better for a loss,
    higher for Rouge-L). Returns the best ones, best first. Rank 0 only."""
    found = complete(run_dir)
    if not found:
        return []
    sign = -1.0 if metric.endswith("rougeL") else 1.0
    scored = [(sign * read_state(p)["metrics"][metric], s, p) for s, p in found
              if read_state(p).get("metrics", {}).get(metric) is not None]
    best = [p for _, _, p in sorted(scored)[:keep_best]]
    keep = {found[-1][1], *best}
    for _, p in found:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    return best
