"""A student run's directory: skip it when this exact run finished, resume it from a checkpoint, start it over, or
refuse, naming what changed."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.config import ConfigError, DistillConfig, config_to_dict, load_config
from pipeline.train import checkpoint

DONE = "done.json"  # written last: the run finished, with its fingerprint


def prepare_run_dir(run_dir: Path, fingerprint: str, cfg: DistillConfig, force: bool, resume: bool) -> Path | None | str:
    """'done' when this exact run finished; the checkpoint to resume from; or None to start (the caller then
    removes what is there). Refuses to discard checkpoints or a finished run unless asked, naming what changed."""
    done = run_dir / DONE
    ckpt = checkpoint.latest(run_dir)
    if force:
        return None
    if done.exists():
        if json.loads(done.read_text()).get("fingerprint") == fingerprint:
            return "done"
        raise ConfigError(f"{run_dir} holds a finished run with another {what_changed(run_dir, cfg)}; set run_name, "
                          "delete it, or start over with --force (make: FORCE=1)")
    if ckpt is not None:
        found = checkpoint.read_state(ckpt).get("fingerprint")
        if not resume:
            raise ConfigError(f"{run_dir} holds an unfinished run with a checkpoint at {ckpt.name}; pass --resume "
                              "to continue it (make: RESUME=1) or --force to start over (make: FORCE=1)")
        if found != fingerprint:
            raise ConfigError(f"{ckpt}: saved by a run with another {what_changed(run_dir, cfg)}; --resume needs the "
                              "same ones (or start over with --force; make: FORCE=1)")
        return ckpt
    if resume and run_dir.exists():
        print(f"distill: {run_dir} has no checkpoint to resume from; starting over")
    return None


def what_changed(run_dir: Path, cfg: DistillConfig) -> str:
    """'config (train.steps 300 -> 500)' from the run's saved config.yaml, or 'data or student' when the config is
    the same (then the cache, the data or the student's weights changed)."""
    try:  # read as this version's config: a setting it added, at its default, is no change
        old = config_to_dict(load_config(DistillConfig, run_dir / "config.yaml"))
    except (ConfigError, OSError):
        try:
            old = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return "config, data or student"

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    a, b = dict(flat(old)), dict(flat(config_to_dict(cfg)))
    diff = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not diff:
        return "data, cache or student weights (same config)"
    return f"config ({', '.join(diff[:4])}{', ...' if len(diff) > 4 else ''})"
