"""Stage `onpolicy`: on-policy distillation as rounds of the offline pipeline.

Round r (1-based), under <out_dir>/round-NNN/ (the first `offpolicy_rounds` rounds skip steps 1 and 2 and train on
the gold cache alone):
  1. rollouts/  the student of round r-1 (round 1: the distill config's student) answers a fresh, seeded subset of
                the prompts (stage `rollout`, sampled);
  2. cache/     the teacher scores exactly those tokens (stage 1 over the rollout directory);
  3. student/   stage 2 continues round r-1's run from its last checkpoint (student and projector weights, AdamW
                moments) for `steps_per_round` steps with L = (1 - alpha) CE(gold) + alpha KD(rollout) on a `mix`
                fraction of micro-batches (KD on the gold micro-batch otherwise). The learning-rate schedule and the
                gold data order are those of one run over all rounds (round r runs its steps (r-1)S+1 .. rS): with
                mix 0 the rounds train exactly the one off-policy run (tested).
  done.json     written last: the round's fingerprint and its student.

Each stage runs in its own process, one after the other: the teacher is loaded only by stage 1, and that process has
exited before stage 2 starts (`stages.jsonl` records each stage process's pid, start and end). Every stage is
resumable on its own (a rollout keeps its written shards, stage 1 its shards, stage 2 its checkpoints), so a killed
run, started again, resumes in the round and stage it died in; a finished round (done.json with the same
fingerprint) is never redone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline import lock
from pipeline.cache.schema import DATA_FILE
from pipeline.cache.store import read_manifest, resolve_cache_dir
from pipeline.config import (
    ConfigError,
    DataConfig,
    DistillConfig,
    ModelRef,
    OnPolicyConfig,
    OnPolicyMixConfig,
    RolloutConfig,
    TeacherCacheConfig,
    config_identity,
    dump_config,
    load_config,
)
from pipeline.io_utils import hash_json, sha256_file, write_json
from pipeline.models.load import model_fingerprint
from pipeline.objectives.table import spec
from pipeline.train.checkpoint import step_name

DONE = "done.json"
STAGES_LOG = "stages.jsonl"
STUDENT_RUN = "student"
# how each stage's process is started (tests replace it to kill a stage at a chosen point)
STAGE_CMD = [sys.executable, "-m", "stages.cli"]


class StageFailed(RuntimeError):
    """A round's stage process exited with an error; re-running the same command resumes where it stopped."""


@dataclasses.dataclass
class Round:
    index: int
    dir: Path
    rollout: RolloutConfig | None  # None: an off-policy round
    cache: TeacherCacheConfig | None
    distill: DistillConfig

    @property
    def student_dir(self) -> Path:
        return self.dir / STUDENT_RUN

    def fingerprint(self, previous: str) -> str:
        return hash_json({"previous": previous, "distill": config_identity(self.distill),
                          **({"rollout": config_identity(self.rollout), "cache": config_identity(self.cache)}
                             if self.rollout is not None else {})})


def plan(cfg: OnPolicyConfig) -> list[Round]:
    """Every round's three stage configs (the configs are read and checked here, before anything runs)."""
    base = load_config(DistillConfig, cfg.distill, cfg.distill_set)
    t_base = load_config(TeacherCacheConfig, cfg.teacher_cache, cfg.teacher_cache_set)
    if base.teachers:
        raise ConfigError(f"{cfg.distill}: on-policy rounds score the student's samples with one teacher (`cache:`); "
                          "`teachers:` (several) is not supported there")
    if base.cache is None or not spec(base.loss.objective).teacher:
        raise ConfigError(f"{cfg.distill}: on-policy rounds train from a teacher cache with a distillation objective "
                          f"(objective {base.loss.objective!r}, cache {base.cache!r})")
    if not base.checkpoint.keep_at_end:
        raise ConfigError(f"{cfg.distill}: each on-policy round continues from the last checkpoint of the round before: "
                          "checkpoint.keep_at_end must be true")
    prompts = cfg.prompts
    if prompts is None:  # the gold cache's own copy of its data

        prompts = DataConfig(path=str(resolve_cache_dir(base.cache) / DATA_FILE), id_field="id")
    out, S, R = Path(cfg.out_dir), cfg.steps_per_round, cfg.rounds
    rounds, student, previous = [], base.student, base.continue_from
    for r in range(1, R + 1):
        rd = out / f"round-{r:03d}"
        seed = cfg.seed * 1000 + r
        rollout = RolloutConfig(model=student, tokenizer=base.student_tokenizer, data=prompts, out_dir=str(rd / "rollouts"),
                                tokenize=base.tokenize, sampling=cfg.sampling, seed=seed, prompts=cfg.prompts_per_round,
                                subset_seed=seed, model_name=f"student-round{r - 1}", round=r)
        cache = dataclasses.replace(t_base, data=DataConfig(path=str(rd / "rollouts")), out_dir=str(rd / "cache"))
        train = dataclasses.replace(base.train, steps=S, schedule_steps=R * S, step_offset=(r - 1) * S)
        on = r > cfg.offpolicy_rounds
        # a LoRA run continues its adapters on the same base (the checkpoint holds the adapters, not the base)
        distill = dataclasses.replace(base, student=base.student if base.lora.enabled else student,
                                      continue_from=previous, train=train,
                                      onpolicy=OnPolicyMixConfig(cache=str(rd / "cache"), mix=cfg.mix) if on else
                                      OnPolicyMixConfig(), out_dir=str(rd), run_name=STUDENT_RUN)
        rounds.append(Round(r, rd, rollout if on else None, cache if on else None, distill))
        student = ModelRef(path=str(rd / STUDENT_RUN / "final"), dtype=base.student.dtype)
        previous = str(rd / STUDENT_RUN / "checkpoints" / step_name(S))  # every run checkpoints its last step
    return rounds


def _stage(rd: Path, stage: str, config: Path, *extra: str) -> None:
    """Run one stage in its own process; its pid, start and end go to <round>/stages.jsonl."""
    cmd = [*STAGE_CMD, stage, "--config", str(config), *extra]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    rc = proc.wait()
    with open(rd / STAGES_LOG, "a") as f:
        f.write(json.dumps({"stage": stage, "pid": proc.pid, "start": t0, "end": time.time(), "returncode": rc}) + "\n")
    if rc != 0:
        raise StageFailed(f"{rd.name}: stage {stage} exited with {rc} ({' '.join(cmd)}); run the same onpolicy "
                          "command again to resume it")


def _inputs(cfg: OnPolicyConfig, first: Round) -> str:
    """What the rounds start from, by content: the gold cache, the first student's and the teacher's weights and the
    prompts (a rebuilt cache or retrained student under the same paths makes every round's done.json stale)."""

    prompts = Path(first.distill.cache if cfg.prompts is None else cfg.prompts.path)
    return hash_json({"gold": read_manifest(resolve_cache_dir(first.distill.cache)).fingerprint,
                      "student": model_fingerprint(first.distill.student),
                      "teacher": model_fingerprint(load_config(TeacherCacheConfig, cfg.teacher_cache,
                                                               cfg.teacher_cache_set).teacher),
                      "prompts": sha256_file(prompts) if prompts.is_file() else None})


def run(cfg: OnPolicyConfig, force: bool = False) -> Path:
    rounds = plan(cfg)
    out = Path(cfg.out_dir)
    with lock.writer(out, "onpolicy"):  # one writer; each round's stages lock their own directories inside it
        return _run(cfg, rounds, out, force)


def _run(cfg: OnPolicyConfig, rounds: list[Round], out: Path, force: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    previous = _inputs(cfg, rounds[0])
    for rnd in rounds:
        fp = rnd.fingerprint(previous)
        previous = fp
        done = rnd.dir / DONE
        if done.is_file() and json.loads(done.read_text()).get("fingerprint") == fp:
            print(f"onpolicy: round {rnd.index} done ({rnd.student_dir / 'final'})")
            continue
        rnd.dir.mkdir(parents=True, exist_ok=True)
        print(f"onpolicy: round {rnd.index} of {len(rounds)}" + (" (off-policy)" if rnd.rollout is None else ""))
        configs = {name: dump_config(c, rnd.dir / f"{name}.yaml")
                   for name, c in (("rollout", rnd.rollout), ("teacher_cache", rnd.cache), ("distill", rnd.distill))
                   if c is not None}
        if rnd.rollout is not None:
            _stage(rnd.dir, "rollout", configs["rollout"])
            _stage(rnd.dir, "teacher-cache", configs["teacher_cache"])
        _stage(rnd.dir, "distill", configs["distill"], "--force" if force else "--resume")
        write_json(done, {"fingerprint": fp, "student": str(rnd.student_dir / "final")})
    final = rounds[-1].student_dir / "final"
    write_json(out / "result.json", {"rounds": len(rounds), "student": str(final)})
    print(f"onpolicy: {len(rounds)} round(s), student in {final}")
    return final
