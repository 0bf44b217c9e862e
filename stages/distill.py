"""Stage 2, `distill`: train the student under DeepSpeed from a teacher cache (or plain SFT from jsonl).

The teacher model is never loaded here: every objective (pipeline/objectives/) reads the teacher's hidden states,
top-k and alignments from the cache and its head (and input embeddings for CMA) from the files saved with it; dense
teacher logits are checked against the cached top-k on every batch. The engine trains the student and the
objective's projectors (their own learning rate). Outputs in <out_dir>/<run name>/: config.yaml (resolved),
metrics.jsonl, final/ (an HF checkpoint with its tokenizer), projectors.safetensors (DSKD objectives), done.json
(written last).
A run whose done.json records the same fingerprint is skipped.

On-policy (reference section 8): with `onpolicy.cache` (a teacher cache of the student's own samples, stage 1 over a
rollout directory) a seeded `onpolicy.mix` fraction of micro-batches takes its KD term from a micro-batch of those
samples (a second student forward) while CE stays on the gold micro-batch. `continue_from` + `train.step_offset`
continue a longer run in pieces (stages/onpolicy.py: one round per piece).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline import lock, stamps
from pipeline.cache.batch import Batch
from pipeline.cache.schema import recompute_tolerance
from pipeline.cache.store import CacheReader, read_manifest, resolve_cache_dir
from pipeline.config import (
    ConfigError,
    DistillConfig,
    LossConfig,
    ModelRef,
    TeacherEntry,
    TrainConfig,
    config_identity,
    config_to_dict,
    dump_config,
)
from pipeline.cpu import keep_freed_memory
from pipeline.data.records import load_examples
from pipeline.data.tokenize import special_ids
from pipeline.io_utils import atomic_save_safetensors, hash_json, write_json
from pipeline.losses import accumulate, is_maximum, token_normaliser
from pipeline.models.load import (
    check_model_ref,
    load_model,
    load_tokenizer,
    model_fingerprint,
    own_memory,
    short_name,
    tokenizer_fingerprint,
)
from pipeline.models.lora import apply_lora
from pipeline.models.zero3 import gathered
from pipeline.objectives.base import TeacherSide
from pipeline.objectives.objective import Ensemble, Objective
from pipeline.objectives.projectors import PROJECTORS_FILE, Projectors, ProjectorSet
from pipeline.objectives.setup import T2S_INIT_FILE, build_projectors, student_side, teacher_from_cache
from pipeline.objectives.table import check_compatible, run_label, spec
from pipeline.train import checkpoint
from pipeline.train.checkpoint import TrainingDiverged
from pipeline.train.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    env_rank_world,
    init_distributed,
)
from pipeline.train.engine import (
    StudentWithProjectors,
    deepspeed_config,
    lr_lambda,
    make_optimizer,
    optimizer_groups,
    zero_stage,
)
from pipeline.train.run_dir import DONE, prepare_run_dir
from pipeline.train.sampler import MicroBatchStream
from pipeline.train.sources import (
    Source,
    cache_source,
    data_source,
    joint_source,
    open_for_student,
    same_teacher,
)
from pipeline.train.step import diagnostics, mixed, on_policy
from pipeline.train.tracking import MetricsLog, check_sinks, peak_memory_mb
from pipeline.train.validation import Validation

FINAL_TMP = ".final-tmp"


def run(cfg: DistillConfig, force: bool = False, resume: bool = False) -> Path:
    """Plan (every check, before any model or process group), build (engine, objective, data), train, commit."""
    with contextlib.ExitStack() as held:  # the run directory's lock, from the first decision about it to the end
        p = plan(cfg, force, resume, held)
        if p.start_from == "done":
            if p.rank == 0:
                _record(p)
                print(f"distill: up to date ({p.run_dir})")
            return p.run_dir
        b = build(p)
        total = train(p, b)
        commit(p, b, total)
        return p.run_dir


# --------------------------------------------------------------------------------------------------------------
# Plan: what a mistake or an up-to-date run costs is seconds: processes, engine template, metric sinks, caches and
# data, the student's tokenizer and files, the run directory (locked before anything in it is read)


@dataclass
class Plan:
    cfg: DistillConfig
    rank: int
    accum: int  # micro-batches per step on each process
    ds: dict  # the DeepSpeed config
    tokenizer: Any
    pad_id: int
    reader: CacheReader | None  # the training cache (None: plain SFT on cfg.data)
    valid_reader: CacheReader | None
    op_reader: CacheReader | None  # the student's own samples, scored by the teacher
    source: Source | None  # plain SFT's tokenized rows, or several teachers' joint rows (one cache's: by build)
    valid_source: Source | None
    run_name: str
    run_dir: Path
    fingerprint: str
    start_from: Path | str | None  # "done", the checkpoint to resume, or None (start)
    # several teachers (`teachers:`): each one's cache read for the student, their names and loss settings
    readers: list[CacheReader] = dataclasses.field(default_factory=list)
    teacher_names: list[str] = dataclasses.field(default_factory=list)
    teacher_losses: list[LossConfig] = dataclasses.field(default_factory=list)


def plan(cfg: DistillConfig, force: bool, resume: bool, held: contextlib.ExitStack) -> Plan:
    tcfg = cfg.train
    rank, world = env_rank_world()
    if tcfg.grad_accum % world:
        raise ConfigError(f"train.grad_accum {tcfg.grad_accum} is not divisible by {world} processes: the global batch "
                          f"is micro_batch_size x grad_accum on any number of processes, each takes grad_accum / "
                          f"{world} of the accumulation (set train.grad_accum to a multiple of {world})")
    ds = deepspeed_config(tcfg, world)
    check_sinks(tcfg.report_to)
    # the caches' manifests or the data first (a wrong path or a bad row is the commonest mistake), then the
    # student's tokenizer, then each cache read for it (its student view built when missing)
    caches = [resolve_cache_dir(c) for c in (cfg.cache, cfg.valid.cache if cfg.cache is not None and cfg.valid.enabled
                                              else None, cfg.onpolicy.cache) if c is not None]
    manifests = [read_manifest(c) for c in caches]
    several = [resolve_cache_dir(t.cache) for t in cfg.teachers]
    several_m = [read_manifest(c) for c in several]
    continue_state = _continue_state(cfg, world)
    examples = load_examples(cfg.data) if cfg.data is not None else None
    valid_examples = load_examples(cfg.valid.data)[: cfg.valid.max_rows] \
        if cfg.data is not None and cfg.valid.enabled else None
    tok_ref = cfg.student_tokenizer or cfg.student
    tokenizer = load_tokenizer(tok_ref)
    _, pad_id = special_ids(tokenizer)
    if caches:  # before any student view is built for it
        _check_caches(cfg.loss, caches, manifests, tokenizer_fingerprint(tokenizer))
    losses = [teacher_loss(cfg.loss, t) for t in cfg.teachers]
    for loss, d, m in zip(losses, several, several_m):
        _check_caches(loss, [d], [m], tokenizer_fingerprint(tokenizer))
    reader = open_for_student(cfg.cache, tokenizer, tok_ref) if cfg.cache is not None else None
    valid_reader = open_for_student(cfg.valid.cache, tokenizer, tok_ref) \
        if reader is not None and cfg.valid.enabled else None
    op_reader = open_for_student(cfg.onpolicy.cache, tokenizer, tok_ref) if cfg.onpolicy.cache is not None else None
    student_name = cfg.student_name or short_name(cfg.student)
    source = valid_source = None
    readers = [open_for_student(d, tokenizer, tok_ref) for d in several]
    names = _teacher_names(cfg, several_m)
    if readers:
        source, left_out = joint_source(readers, pad_id)
        if rank == 0:
            print(f"distill: {len(source)} rows in all {len(readers)} teachers' caches ({', '.join(names)}); "
                  f"{left_out} row(s) of some but not all left out")
        run_name = cfg.run_name or f"{'+'.join(names)}_to_{student_name}__{run_label(cfg.loss.objective, cfg.loss.divergence)}"
        identity = {"source": source.fingerprint, "valid": None}
    elif reader is not None:
        label = run_label(cfg.loss.objective, cfg.loss.divergence)
        run_name = cfg.run_name or f"{reader.manifest.teacher_name}_to_{student_name}__{label}"
        identity = {"source": reader.fingerprint, "valid": valid_reader.fingerprint if valid_reader else None}
    else:
        run_name = cfg.run_name or f"{student_name}__sft"
        say = rank == 0  # truncation is reported once, by rank 0, naming the run (two SFT runs share their data)
        source = data_source(examples, tokenizer, cfg.tokenize, pad_id, f"distill {run_name} ({cfg.data.path})" if say else "")
        if valid_examples is not None:
            valid_source = data_source(valid_examples, tokenizer, cfg.tokenize, pad_id,
                                       f"distill {run_name} valid ({cfg.valid.data.path})" if say else "")
        identity = {"source": source.fingerprint, "valid": valid_source.fingerprint if valid_source else None}
    for what, n in ((f"cache {reader.dir}", len(reader)) if reader is not None else
                    (f"teachers' common rows ({names[0]}, ...)", len(source)) if readers else
                    (f"data {cfg.data.path}", len(source)),
                    *(((f"onpolicy.cache {op_reader.dir}", len(op_reader)),) if op_reader else ())):
        if n < tcfg.micro_batch_size:  # with the data, before any engine starts
            raise ConfigError(f"{what}: {n} rows cannot fill one micro-batch of {tcfg.micro_batch_size} "
                              "(train.micro_batch_size)")
    check_model_ref(cfg.student)
    run_dir = Path(cfg.out_dir) / run_name
    held.enter_context(lock.writer(run_dir, "distill", take=rank == 0))  # one writer: before anything is read or removed
    # the run's identity; not the number of processes, which does not change the result (same global batch)
    fingerprint = hash_json({"config": config_identity(cfg), **identity, "student": model_fingerprint(cfg.student),
                             **({"onpolicy": op_reader.fingerprint} if op_reader else {}),
                             **({"continue_from": continue_state["fingerprint"], "continue_step": continue_state["step"]}
                                if continue_state else {})})
    return Plan(cfg, rank, tcfg.grad_accum // world, ds, tokenizer, pad_id, reader, valid_reader, op_reader,
                source, valid_source, run_name, run_dir, fingerprint,
                prepare_run_dir(run_dir, fingerprint, cfg, force, resume), readers, names, losses)


def teacher_loss(loss: LossConfig, t: TeacherEntry) -> LossConfig:
    """A teacher's loss settings among several: the run's, with its own objective and divergence where it sets them."""
    return dataclasses.replace(loss, objective=t.objective or loss.objective, divergence=t.divergence or loss.divergence)


def _teacher_names(cfg: DistillConfig, manifests: list) -> list[str]:
    """Each teacher's name (its `name`, else its cache's teacher name), numbered where two would be equal."""
    base = [t.name or m.teacher_name for t, m in zip(cfg.teachers, manifests)]
    return [f"{n}{base[:i].count(n) + 1}" if base.count(n) > 1 else n for i, n in enumerate(base)]


def _record(p: Plan) -> None:
    """The quick up-to-date check's record of this run (pipeline/stamps.py)."""
    stamps.record(Path(p.cfg.out_dir), stamps.quick_key(p.cfg, stamps.distill_inputs(p.cfg)),
                  {"dir": p.run_name, "fingerprint": p.fingerprint})


def _continue_state(cfg: DistillConfig, world: int) -> dict | None:
    if cfg.continue_from is None:
        return None
    try:
        state = checkpoint.read_state(Path(cfg.continue_from))
    except (OSError, ValueError):
        raise ConfigError(f"continue_from: {cfg.continue_from} is not a complete checkpoint (no readable "
                          f"{checkpoint.STATE})") from None
    if state.get("world_size") != world:
        raise ConfigError(f"continue_from: {cfg.continue_from} was saved by {state.get('world_size')} "
                          f"process(es), this run has {world}; continue with the same number")
    return state


def _check_caches(loss: LossConfig, dirs: list[Path], manifests: list, student_fp: str) -> None:
    """The caches (the training cache first) come from one teacher and can serve the objective of `loss` for a
    student whose tokenizer has the fingerprint `student_fp`."""
    m = manifests[0]
    same = student_fp == m.teacher_tokenizer_fingerprint
    try:
        check_compatible(loss.objective, same, m.embeddings_sha256 is not None,
                         f"{dirs[0]} (teacher tokenizer {m.teacher_tokenizer_fingerprint[:12]}, this student's "
                         f"{student_fp[:12]})")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if loss.teacher_logits == "dense" and not m.head_exact:
        raise ConfigError(f"{dirs[0]}: the teacher's head could not be reproduced when the cache was built, so "
                          "it holds top-k + tail only; set loss.teacher_logits: sparse (or auto)")
    for d, other in zip(dirs[1:], manifests[1:]):
        same_teacher(dirs[0], m, d, other)


# --------------------------------------------------------------------------------------------------------------
# Build: the process group, the data, the student (+ LoRA) and projectors, optimizer, schedule, engine, objective


@dataclass
class Built:
    dist: DistInfo
    engine: Any
    scheduler: Any
    compute: Objective | Ensemble
    ce_only: Objective  # the gold micro-batch's CE when KD comes from the student's samples
    projectors: Projectors | ProjectorSet | None
    teacher: TeacherSide | None  # (several teachers: the first's)
    source: Source
    stream: MicroBatchStream
    op_source: Source | None
    op_stream: MicroBatchStream | None
    validation: Validation | None
    first: int  # the first step to run
    total: float  # the last loss (a resumed run's, until it trains)
    t_start: float = 0.0


def build(p: Plan) -> Built:
    cfg, tcfg = p.cfg, p.cfg.train
    dist = init_distributed()
    if dist.device.type == "cpu":
        keep_freed_memory()
    if dist.is_main and p.start_from is None and p.run_dir.exists():  # forced, or unfinished without a checkpoint
        shutil.rmtree(p.run_dir)  # start over, never append
    teacher, vmap, source, valid_source = None, None, p.source, p.valid_source
    if p.reader is not None:
        if spec(cfg.loss.objective).teacher:
            teacher, vmap = teacher_from_cache(cfg.loss, p.reader, p.tokenizer, dist.device)
        source = cache_source(p.reader, p.pad_id)
        if p.valid_reader is not None:
            valid_source = cache_source(p.valid_reader, p.pad_id, cfg.valid.max_rows)
    stream = MicroBatchStream(source.lengths, tcfg.micro_batch_size, tcfg.seed, group_by_length=tcfg.group_by_length)
    op_source = op_stream = None
    if p.op_reader is not None:
        op_source = cache_source(p.op_reader, p.pad_id)
        op_stream = MicroBatchStream(op_source.lengths, tcfg.micro_batch_size, tcfg.seed + 1,
                                     group_by_length=tcfg.group_by_length)
        if teacher is not None:  # the recomputation check accepts what either cache's storage costs
            head_dtype = str(teacher.head.weight.dtype).removeprefix("torch.")
            teacher.check_tol = max(teacher.check_tol, recompute_tolerance(p.op_reader.manifest, head_dtype))
    barrier()
    if dist.is_main and p.start_from is None:
        p.run_dir.mkdir(parents=True)
        dump_config(cfg, p.run_dir / "config.yaml")
    random.seed(tcfg.seed + dist.rank)
    np.random.seed(tcfg.seed + dist.rank)
    torch.manual_seed(tcfg.seed + dist.rank)
    import deepspeed  # seconds to import: not for runs that are up to date or refused

    student = load_model(cfg.student, dtype="float32").train().to(dist.device)
    if dist.device.type == "cpu" and not cfg.lora.enabled:  # a LoRA base is frozen: read only, it may stay mapped
        own_memory(student)
    projectors = None
    if p.readers:
        compute, projectors, teacher = _teachers(p, student, source, dist)
    elif teacher is not None:
        scores = _scores_init(cfg, p.start_from)
        sample = _init_sample(source, tcfg, dist.device) if scores else []
        projectors = build_projectors(cfg.loss, student, teacher, vmap, sample, weights_follow=not scores)
        if projectors is not None and dist.is_main and p.start_from is None and cfg.continue_from is None:
            _report_t2s_init(p.run_dir, projectors.init_report)
    if cfg.lora.enabled:
        student = apply_lora(student, cfg.lora)
    if tcfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(optimizer_groups(student, projectors, tcfg), tcfg, p.ds)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=StudentWithProjectors(student, projectors),
                                                           optimizer=optimizer, lr_scheduler=scheduler, config=p.ds)
    if not p.readers:
        compute = Objective(cfg.loss, teacher, projectors, cfg.loss.chunk_positions) if teacher is not None else \
            Objective(cfg.loss, chunk_positions=cfg.loss.chunk_positions)
    b = Built(dist, engine, scheduler, compute,
              Objective(dataclasses.replace(cfg.loss, objective="sft"), chunk_positions=cfg.loss.chunk_positions),
              projectors, teacher, source, stream, op_source, op_stream,
              Validation(cfg, valid_source, p.tokenizer, dist, zero_stage(p.ds)) if valid_source else None,
              1, float("nan"))
    _restore(p, b, optimizer)
    return b


def _teachers(p: Plan, student, source: Source, dist) -> tuple[Ensemble, ProjectorSet | None, TeacherSide]:
    """Several teachers: each one's frozen pieces from its cache, its projectors (its objective's, initialised on
    its own collation of the sampled rows), its objective; together the ensemble (and the first's TeacherSide)."""
    cfg = p.cfg
    objectives, members, sides = [], {}, []
    sample = _init_sample(source, cfg.train, dist.device) if any(
        _scores_init(dataclasses.replace(cfg, loss=loss), p.start_from) for loss in p.teacher_losses) else []
    for i, (reader, name, loss) in enumerate(zip(p.readers, p.teacher_names, p.teacher_losses)):
        side, vmap = teacher_from_cache(loss, reader, p.tokenizer, dist.device)
        scores = _scores_init(dataclasses.replace(cfg, loss=loss), p.start_from)
        own = [b if i == 0 else b.others[i - 1] for b in sample] if scores else []
        proj = build_projectors(loss, student, side, vmap, own, weights_follow=not scores)
        if proj is not None:
            members[name] = proj
            if dist.is_main and p.start_from is None and cfg.continue_from is None:
                _report_t2s_init(p.run_dir, proj.init_report, name)
        objectives.append(Objective(loss, side, proj, cfg.loss.chunk_positions))
        sides.append(side)
    if dist.is_main:
        mb = [sum(t.numel() * t.element_size() for t in (s.head.weight, s.embeddings) if t is not None) / 2**20
              for s in sides]
        print(f"distill: {len(sides)} teachers' heads resident ({', '.join(f'{n} {m:.0f} MB' for n, m in zip(p.teacher_names, mb))}"
              f"; {sum(mb):.0f} MB in all), weights {[t.weight for t in cfg.teachers]}")
    return Ensemble(objectives, [t.weight for t in cfg.teachers], p.teacher_names), \
        (ProjectorSet(members) if members else None), sides[0]


def _restore(p: Plan, b: Built, optimizer) -> None:
    """A continued run: a longer run's weights, projectors and AdamW moments; a resumed one: its checkpoint."""
    cfg, dist = p.cfg, b.dist
    if p.start_from is None and cfg.continue_from is not None:
        checkpoint.load_weights_and_optimizer(b.engine, Path(cfg.continue_from), strict=not cfg.lora.enabled)
        for group, lr, base in zip(optimizer.param_groups, b.scheduler.get_last_lr(), b.scheduler.base_lrs):
            group.update(lr=lr, initial_lr=base)  # this run's schedule, not the saved run's last learning rate
        if dist.is_main:
            print(f"distill: continuing from {cfg.continue_from} (weights, projectors, optimizer state)")
    if isinstance(p.start_from, Path):
        state = checkpoint.load(b.engine, p.start_from, dist, strict=not cfg.lora.enabled)
        b.first, b.total = state["step"] + 1, state["metrics"]["train_loss"]
        if dist.is_main:
            print(f"distill: resuming {p.run_name} after step {state['step']} ({p.start_from})")


INIT_SAMPLE_ROWS = 64


def _scores_init(cfg: DistillConfig, start_from) -> bool:
    """Whether this run chooses t2s's initialisation on cached rows (a resumed or continued run loads its weights)."""
    return spec(cfg.loss.objective).t2s_init == "logit_identity" and start_from is None and cfg.continue_from is None


def _init_sample(source: Source, tcfg: TrainConfig, device) -> list[Batch]:
    """A seeded sample of the training rows (the same on every rank), in micro-batches, for `init_t2s: auto`."""
    pick = np.sort(np.random.default_rng(tcfg.seed).choice(len(source), min(INIT_SAMPLE_ROWS, len(source)),
                                                           replace=False))
    m = tcfg.micro_batch_size
    return [source.collate(pick[i : i + m].tolist()).to(device) for i in range(0, len(pick), m)]


def _report_t2s_init(run_dir: Path, report: dict, teacher: str | None = None) -> None:
    """Say which t2s initialisation the run starts from, and why (<run>/t2s_init.json keeps it for `dskd report`;
    one of several teachers': <run>/t2s_init.<teacher>.json)."""
    write_json(run_dir / (T2S_INIT_FILE if teacher is None else f"t2s_init.{teacher}.json"), report)
    r = report
    if "t2s_init_fit_ce" in r:
        plain = (f"; plain t2s_ce {r['t2s_init_plain_ce']:.3f}, agreement {r['t2s_init_plain_agreement']:.3f}"
                 if "t2s_init_plain_ce" in r else "")
        whose = f"{teacher}'s " if teacher else ""
        print(f"distill: {whose}t2s starts at the {'logit-identity fit' if r['t2s_init'] == 'fit' else 'plain init'} "
              f"(loss.init_t2s {str(r['init_t2s']).lower()}, {r['positions']} cached positions: fit t2s_ce "
              f"{r['t2s_init_fit_ce']:.3f}, agreement {r['t2s_init_fit_agreement']:.3f}{plain}; uniform "
              f"{r['uniform_ce']:.3f}, teacher {r['teacher_ce']:.3f}: the fit goes {100 * r['fit_gap_closed']:.0f}% of "
              "the way)")



# --------------------------------------------------------------------------------------------------------------
# Train: batch -> forward -> objective -> backward -> step -> log -> validate -> checkpoint


def train(p: Plan, b: Built) -> float:
    cfg, tcfg, dist = p.cfg, p.cfg.train, b.dist
    log = MetricsLog(p.run_dir, p.run_name, config_to_dict(cfg), tcfg.report_to, b.first - 1 if b.first > 1 else None) \
        if dist.is_main else None
    bar = tqdm(total=tcfg.steps, initial=b.first - 1, desc=f"distill {p.run_name}", disable=not dist.is_main,
               mininterval=2.0)
    total, b.t_start = b.total, time.perf_counter()
    try:  # the bar and the metrics file are closed whatever happens (no stray bar after an error)
        for step in range(b.first, tcfg.steps + 1):
            t0 = time.perf_counter()
            last = step == tcfg.steps
            logged = step % tcfg.log_every == 0 or step == 1 or last
            m = _step(p, b, step, logged)
            # the per-term gradient diagnostics of logged steps are timed apart: step_s is the training step's
            diag_s = m.pop("diagnostics_s", 0.0)
            total, step_s, loss_tokens = m["loss"], time.perf_counter() - t0 - diag_s, m.pop("loss_tokens")
            tok_s = m.pop("seen_tokens") / step_s
            ckpt_now = cfg.checkpoint.keep_at_end if last else cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0
            valid = b.validation(b.engine, b.compute) if b.validation and (ckpt_now or last or step % cfg.valid.every == 0) else {}
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
            if log is not None and (logged or valid):
                log.write({"step": step, **m, **valid, "lr": b.scheduler.get_last_lr()[0], "tokens_per_s": tok_s,
                           "step_s": step_s, **({"diagnostics_s": diag_s} if diag_s else {}), "loss_tokens": loss_tokens,
                           **peak_memory_mb(dist.device), "elapsed_s": time.perf_counter() - b.t_start})
            if ckpt_now:
                _save_checkpoint(p, b, step, {"train_loss": total, **valid})
    finally:
        bar.close()
        if log is not None:
            log.close()
    return total


def _step(p: Plan, b: Built, step: int, logged: bool) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; each term's token mean over the global batch, the
    objective's statistics reduced by `losses.accumulate`'s convention, and the diagnostics at logged steps."""
    cfg, tcfg, dist, engine = p.cfg, p.cfg.train, b.dist, b.engine
    data_step = step + tcfg.step_offset  # the data order of a longer run continues (on-policy rounds)
    micro = [b.source.collate(idx) for idx in b.stream.for_step(data_step, dist.rank, dist.world_size, p.accum)]
    # on-policy: the micro-batches (by global index, so any world size draws alike) whose KD term is computed on a
    # micro-batch of the student's own samples instead of the gold one
    first_k = (data_step - 1) * p.accum * dist.world_size + dist.rank * p.accum
    kd_micro = [b.op_source.collate(b.op_stream[k]) if on_policy(tcfg.seed, k, cfg.onpolicy.mix) else None
                for k in range(first_k, first_k + p.accum)] if b.op_stream is not None else [None] * p.accum
    global_tokens, global_kd = all_reduce_sum([sum(x.n_tokens for x in micro),
                                               sum((o or x).n_tokens for x, o in zip(micro, kd_micro))], dist.device)
    normaliser = token_normaliser(int(global_tokens), p.accum, dist.world_size)
    kd_normaliser = token_normaliser(int(global_kd), p.accum, dist.world_size)
    sums: dict[str, float] = {}
    stats: dict[str, float] = {}
    diag: dict[str, float] = {}
    seen_tokens = 0
    for batch, kd_batch in zip(micro, kd_micro):
        batch = batch.to(dist.device)
        hidden = engine(batch.input_ids, batch.attention_mask)
        if b.op_stream is None:
            side = student_side(engine.module.student, batch, hidden)
            # this rank's first micro-batch; not under ZeRO-3, whose partitioned head is gathered only inside the
            # engine's own passes
            if b.teacher is not None and logged and tcfg.grad_diagnostics and not diag and zero_stage(p.ds) < 3:
                t_diag = time.perf_counter()
                diag = diagnostics(b.compute, batch, side, normaliser, b.projectors, cfg.loss.alpha)
                diag["diagnostics_s"] = time.perf_counter() - t_diag
            out = b.compute(batch, side, normaliser)
        else:
            out = mixed(engine, b.compute, b.ce_only, cfg.loss.alpha, batch, hidden, kd_batch, normaliser,
                        kd_normaliser, dist.device)
        if not torch.isfinite(out.loss):
            bad = [k for k, v in out.terms.items() if not torch.isfinite(v)] or ["loss"]
            last_ckpt = checkpoint.latest(p.run_dir)
            raise TrainingDiverged(f"step {step}: non-finite {', '.join(bad)} (rows {batch.ids[:4]}); nothing was "
                                   "saved for this step" + (f", the last checkpoint is {last_ckpt}" if last_ckpt else ""))
        engine.backward(out.loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        if boundary and b.projectors is not None:
            b.projectors.head_updated()
        accumulate(sums, {"loss": float(out.loss.detach()), **{k: float(v.detach()) for k, v in out.terms.items()}})
        accumulate(stats, out.stats)
        seen_tokens += int(batch.attention_mask.sum())
    # each term is (sum over the micro-batch) / N-bar: their mean over micro-batches and ranks is a token mean; a
    # statistic is a mean over micro-batches, or the maximum over micro-batches and ranks
    names = sorted(sums) + sorted(k for k in stats if not is_maximum(k))
    reduced = all_reduce_sum([{**sums, **stats}[k] for k in names] + [seen_tokens], dist.device)
    maxima = sorted(k for k in stats if is_maximum(k))
    out = {k: v / tcfg.grad_accum for k, v in zip(names, reduced)}
    out.update(zip(maxima, all_reduce_max([stats[k] for k in maxima], dist.device)))
    return {**out, **diag, "loss_tokens": int(global_tokens), "seen_tokens": reduced[-1]}


def _write_student(p: Plan, b: Built, where: Path, name: str = "student") -> None:
    """The student (and projectors) into `where` (collective under ZeRO-3; rank 0 writes)."""
    with gathered(b.engine.module.parameters()):
        if b.dist.is_main:
            checkpoint.save_student(b.engine.module.student, where / name, p.tokenizer, p.cfg.student)
            if b.projectors is not None:
                atomic_save_safetensors(where / PROJECTORS_FILE,
                                        {k: v.detach().contiguous() for k, v in b.projectors.state_dict().items()})


def _save_checkpoint(p: Plan, b: Built, step: int, metrics: dict) -> None:
    checkpoint.check_finite_weights(b.engine.module, step, b.dist)
    state = {"fingerprint": p.fingerprint, "micro_batches": step * p.cfg.train.grad_accum, "metrics": metrics}
    checkpoint.save(b.engine, p.run_dir, step, state, b.dist, lambda where: _write_student(p, b, where),
                    exclude_frozen=p.cfg.lora.enabled)
    if b.dist.is_main:
        best = checkpoint.prune(p.run_dir, p.cfg.checkpoint.keep_best, p.cfg.checkpoint.metric)
        if best:
            write_json(p.run_dir / "best.json", {"metric": p.cfg.checkpoint.metric, "checkpoints": [c.name for c in best]})


# --------------------------------------------------------------------------------------------------------------
# Commit: the final student, an HF directory (or LoRA adapter) that from_pretrained loads; done.json last


def commit(p: Plan, b: Built, total: float) -> None:
    cfg, dist, run_dir = p.cfg, b.dist, p.run_dir

    def write(tmp: Path) -> Path | None:
        _write_student(p, b, tmp.parent, tmp.name)  # projectors beside final/, in the run directory
        if dist.is_main and cfg.lora.enabled and cfg.lora.save == "merged":  # base + adapter, merged: what is reloaded
            merged = tmp.with_name(f"{FINAL_TMP}-merged")
            checkpoint.save_student(load_model(ModelRef(path=str(tmp))), merged, p.tokenizer, cfg.student)
            shutil.rmtree(tmp)
            return merged
        return None

    last = checkpoint.latest(run_dir)
    intact = f"{last} is intact" if last else "the run has no checkpoint to keep"
    final = checkpoint.commit(run_dir / "final", run_dir / FINAL_TMP, f"{FINAL_TMP}*", dist, write, "the final student",
                              intact)
    if dist.is_main:
        write_json(run_dir / DONE, {"fingerprint": p.fingerprint, "steps": cfg.train.steps, "final_loss": total,
                                    "wall_s": time.perf_counter() - b.t_start})
        _record(p)
        if not cfg.checkpoint.keep_at_end:  # after done.json: a kill in between leaves a finished run with checkpoints
            shutil.rmtree(run_dir / checkpoint.CHECKPOINTS, ignore_errors=True)
        print(f"distill: {cfg.train.steps} steps, final loss {total:.4f}, student in {final}")
    barrier()
