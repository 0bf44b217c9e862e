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
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import checkpoint, lock, stamps
from pipeline.alignment import edit_distance_vocab_map
from pipeline.batch import Batch, collate_cache_rows, collate_examples
from pipeline.cache_io import CacheReader
from pipeline.cache_schema import DATA_FILE, recompute_tolerance
from pipeline.checkpoint import TrainingDiverged
from pipeline.config import (
    ConfigError,
    DataConfig,
    DistillConfig,
    ModelRef,
    SamplingConfig,
    TrainConfig,
    config_identity,
    config_to_dict,
    dump_config,
    load_config,
)
from pipeline.data import Example, load_examples
from pipeline.distributed import DistInfo, all_reduce_sum, barrier, env_rank_world, init_distributed
from pipeline.io_utils import atomic_save_safetensors, hash_json, save_pretrained, write_json
from pipeline.lora import apply_lora, save_adapter
from pipeline.losses import token_normaliser
from pipeline.metrics import rouge_l
from pipeline.models import (
    StudentWithProjectors,
    check_model_ref,
    gathered,
    keep_freed_memory,
    load_model,
    load_tokenizer,
    model_fingerprint,
    short_name,
    tokenizer_fingerprint,
)
from pipeline.objectives import (
    LOGIT_IDENTITY,
    NEEDS_EMBEDDINGS,
    NEEDS_TEACHER,
    T2S_INIT_FILE,
    Objective,
    ObjectiveOutput,
    StudentSide,
    TeacherSide,
    build_projectors,
    check_compatible,
    detached_side,
    student_side,
    term_grad_norms,
)
from pipeline.projectors import PROJECTORS_FILE
from pipeline.rollout import generate_texts
from pipeline.sampler import MicroBatchStream, eval_batches
from pipeline.tokenize import Truncation, encode, encode_prompt, special_ids, token_surfaces
from pipeline.tracking import MetricsLog, check_sinks, peak_memory_mb

DONE = "done.json"
FINAL_TMP = ".final-tmp"


# --------------------------------------------------------------------------------------------------------------
# Set-up helpers


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


def save_student(model, path: Path, tokenizer, base: ModelRef) -> None:
    """The student with its tokenizer: full weights (HF format) or, for a LoRA student, the adapter."""
    if hasattr(model, "peft_config"):
        save_adapter(model, path, base)
    else:
        save_pretrained(model, path)
    tokenizer.save_pretrained(path)


def _teacher_side(cfg: DistillConfig, reader: CacheReader, student_tok, device) -> tuple[TeacherSide, np.ndarray | None]:
    """The teacher's frozen pieces from the cache (whether it can serve the objective was checked before)."""
    m, objective = reader.manifest, cfg.loss.objective
    where, mode = str(reader.dir), cfg.loss.teacher_logits
    vmap = None if m.same_tokenizer else reader.vocab_map()
    head = reader.load_head(device)
    teacher = TeacherSide(
        head=head,
        dense=m.head_exact if mode == "auto" else mode == "dense",
        check_tol=recompute_tolerance(m, head_dtype := str(head.weight.dtype).removeprefix("torch.")),
        check_source=f"a {m.hidden_encoding} cache ({where}; {head_dtype} head; logit error measured when it was "
                     f"built {max(m.storage_error['topk_max_error'], m.storage_error['lse_max_error']):.3g})",
        embeddings=reader.load_embeddings().to(device) if objective in NEEDS_EMBEDDINGS else None,
        vocab_map=None if vmap is None else torch.from_numpy(vmap).long().to(device),
    )
    if objective == "mined":
        teacher_tok = load_tokenizer(ModelRef(path=str(reader.dir / "teacher_tokenizer")))
        mined = edit_distance_vocab_map(token_surfaces(teacher_tok), token_surfaces(student_tok), vmap)
        teacher.mined_map = torch.from_numpy(mined).long().to(device)
    return teacher, vmap


# --------------------------------------------------------------------------------------------------------------
# Data: a cache (teacher side included) or tokenized examples (plain SFT), read by index


@dataclass
class Source:
    lengths: np.ndarray  # (rows,) student sequence lengths
    collate: Callable[[list[int]], Batch]
    fingerprint: str
    examples: Callable[[list[int]], list[Example]]  # prompt / response of rows (validation generation)

    def __len__(self) -> int:
        return len(self.lengths)


def cache_source(reader: CacheReader, pad_id: int, limit: int | None = None) -> Source:
    n = len(reader) if limit is None else min(limit, len(reader))
    by_id: dict[str, Example] = {}

    def examples(idx: list[int]) -> list[Example]:  # the cache's own copy of its data, read on first use
        if not by_id:
            by_id.update((e.id, e) for e in load_examples(DataConfig(path=str(reader.dir / DATA_FILE), id_field="id")))
        return [by_id[reader[i].id] for i in idx]

    return Source(reader.lengths()[:n], lambda idx: collate_cache_rows([reader[i] for i in idx], pad_id),
                  reader.manifest.fingerprint, examples)


def data_source(examples: list[Example], tokenizer, tok_cfg, pad_id: int, where: str = "") -> Source:
    """Tokenized examples (plain SFT); truncation reported once under `where` (empty: not reported)."""
    cut = Truncation()
    encoded = []
    for e in examples:
        enc = encode(tokenizer, e.prompt, e.response, tok_cfg)
        cut.add_encoded(e.id, enc, tok_cfg)
        encoded.append((e.id, enc))
    if where and (msg := cut.message(tok_cfg, where)):
        print(msg)
    return Source(np.array([len(e.ids) for _, e in encoded], dtype=np.int64),
                  lambda idx: collate_examples([encoded[i] for i in idx], pad_id),
                  hash_json([[i, e.ids, e.response_start] for i, e in encoded]),
                  lambda idx: [examples[i] for i in idx])


def _same_teacher(train: CacheReader, valid: CacheReader) -> None:
    a, b = train.manifest, valid.manifest
    if (a.head_sha256, a.fingerprint_inputs.get("teacher"), a.same_tokenizer) != (
        b.head_sha256, b.fingerprint_inputs.get("teacher"), b.same_tokenizer
    ):
        raise ConfigError(f"valid.cache {valid.dir} was built with another teacher than the training cache {train.dir}")


# --------------------------------------------------------------------------------------------------------------
# Validation: every loss term on the validation rows, and greedy-decoded Rouge-L on the first `generate_rows`


def _rank_share(n: int, dist: DistInfo) -> list[int | None]:
    """Rank r's items r, r + world, ...; padded with None so every rank runs the same number of forwards (ZeRO-3
    gathers are collective)."""
    per_rank = -(-n // dist.world_size)
    return [i if (i := dist.rank + j * dist.world_size) < n else None for j in range(per_rank)]


class Validation:
    def __init__(self, cfg: DistillConfig, source: Source, tokenizer, dist: DistInfo, zero_stage: int):
        self.cfg, self.source, self.tokenizer, self.dist = cfg.valid, source, tokenizer, dist
        self.batches = eval_batches(source.lengths, cfg.valid.micro_batch_size)
        self.n_rows = len(source)
        self.gen_rows = list(range(min(cfg.valid.generate_rows, len(source))))
        self.synced = zero_stage == 3 and dist.world_size > 1
        self.tok_cfg = cfg.tokenize
        mine = [j for j in _rank_share(len(self.batches), dist) if j is not None]
        (total,) = all_reduce_sum([sum(source.collate(self.batches[j]).n_tokens for j in mine)], dist.device)
        self.normaliser = token_normaliser(int(total), len(self.batches), 1)  # each term: its token mean over all rows

    @torch.no_grad()
    def __call__(self, engine, compute: Objective) -> dict[str, float]:
        module = engine.module
        module.eval()
        sums: dict[str, float] = {}
        for j in _rank_share(len(self.batches), self.dist):
            batch = self.source.collate(self.batches[0 if j is None else j]).to(self.dist.device)
            hidden = module(batch.input_ids, batch.attention_mask)
            out = compute(batch, student_side(module.student, batch, hidden), self.normaliser)
            for k, v in [("loss", out.loss), *out.terms.items()]:  # the same names on every rank and batch
                sums[k] = sums.get(k, 0.0) + (float(v) if j is not None else 0.0)
        names = sorted(sums)
        reduced = all_reduce_sum([sums[k] for k in names], self.dist.device)
        # sums of (batch sum / N-bar) over all batches, N-bar = tokens / batches: divide by the batch count
        result = {f"valid_{k}": v / len(self.batches) for k, v in zip(names, reduced)}
        if self.gen_rows:
            result["valid_rougeL"] = self._rouge(module.student)
        module.train()
        return result

    def _rouge(self, student) -> float:
        mine = _rank_share(len(self.gen_rows), self.dist)
        rows = [self.gen_rows[0 if j is None else j] for j in mine]
        examples = self.source.examples(rows)
        prompts = [encode_prompt(self.tokenizer, e.prompt, self.tok_cfg) for e in examples]
        g = SamplingConfig(max_new_tokens=self.cfg.max_new_tokens, batch_size=self.cfg.micro_batch_size)
        preds = generate_texts(student, self.tokenizer, prompts, g, None, progress=False, synced_gpus=self.synced)
        local = sum(rouge_l(p, [e.response]) for j, p, e in zip(mine, preds, examples) if j is not None)
        (total,) = all_reduce_sum([local], self.dist.device)
        return 100 * total / len(self.gen_rows)


# --------------------------------------------------------------------------------------------------------------
# On-policy micro-batches (reference section 8): L = (1 - alpha) CE(gold) / N-bar + alpha KD(rollout) / N-bar_kd


def on_policy(seed: int, k: int, mix: float) -> bool:
    """Whether global micro-batch k takes its KD term from the student's samples (seeded, about `mix` of them)."""
    return mix > 0 and np.random.default_rng([seed, k]).random() < mix


def _mixed(engine, compute: Objective, ce_only: Objective, alpha: float, batch: Batch, hidden: torch.Tensor,
           kd_batch: Batch | None, normaliser: float, kd_normaliser: float, device) -> ObjectiveOutput:
    """CE on the gold micro-batch (normalised by the gold label count) + KD on `kd_batch` when given (a second
    student forward), else on the gold batch (normalised by the count of labels that KD terms were computed on)."""
    student = engine.module.student
    if kd_batch is None:
        out = compute(batch, student_side(student, batch, hidden), kd_normaliser)
        ce = out.terms["ce"] * (kd_normaliser / normaliser)  # CE is a sum over labels / the normaliser
    else:
        ce = ce_only(batch, student_side(student, batch, hidden), normaliser).terms["ce"]
        kd_batch = kd_batch.to(device)
        kd_hidden = engine(kd_batch.input_ids, kd_batch.attention_mask)
        out = compute(kd_batch, student_side(student, kd_batch, kd_hidden), kd_normaliser)
    kd_terms = {k: v for k, v in out.terms.items() if k != "ce"}
    kd = kd_terms.get("kd", torch.zeros((), device=ce.device))
    return ObjectiveOutput((1 - alpha) * ce + alpha * kd, {"ce": ce, **kd_terms},
                           {**out.stats, "onpolicy_fraction": float(kd_batch is not None)})


# --------------------------------------------------------------------------------------------------------------
# Run directory: skip, refuse, resume or start over


def _prepare_run_dir(run_dir: Path, fingerprint: str, cfg: DistillConfig, force: bool, resume: bool) -> Path | None | str:
    """'done' when this exact run finished; the checkpoint to resume from; or None to start (the caller then
    removes what is there). Refuses to discard checkpoints or a finished run unless asked, naming what changed."""
    done = run_dir / DONE
    ckpt = checkpoint.latest(run_dir)
    if force:
        return None
    if done.exists():
        if json.loads(done.read_text()).get("fingerprint") == fingerprint:
            return "done"
        raise ConfigError(f"{run_dir} holds a finished run with another {_what_changed(run_dir, cfg)}; set run_name, "
                          "delete it, or start over with --force (make: FORCE=1)")
    if ckpt is not None:
        found = checkpoint.read_state(ckpt).get("fingerprint")
        if not resume:
            raise ConfigError(f"{run_dir} holds an unfinished run with a checkpoint at {ckpt.name}; pass --resume "
                              "to continue it (make: RESUME=1) or --force to start over (make: FORCE=1)")
        if found != fingerprint:
            raise ConfigError(f"{ckpt}: saved by a run with another {_what_changed(run_dir, cfg)}; --resume needs the "
                              "same ones (or start over with --force; make: FORCE=1)")
        return ckpt
    if resume and run_dir.exists():
        print(f"distill: {run_dir} has no checkpoint to resume from; starting over")
    return None


def _what_changed(run_dir: Path, cfg: DistillConfig) -> str:
    """'config (train.steps 300 -> 500)' from the run's saved config.yaml, or 'data or student' when the config is
    the same (then the cache, the data or the student's weights changed)."""
    try:  # read as this version's config: a setting it added, at its default, is no change
        old = config_to_dict(load_config(DistillConfig, run_dir / "config.yaml"))
    except (ConfigError, OSError):
        import yaml

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


# --------------------------------------------------------------------------------------------------------------


INIT_SAMPLE_ROWS = 64


def _scores_init(cfg: DistillConfig, start_from) -> bool:
    """Whether this run chooses t2s's initialisation on cached rows (a resumed or continued run loads its weights)."""
    return cfg.loss.objective in LOGIT_IDENTITY and start_from is None and cfg.continue_from is None


def _init_sample(source: Source, tcfg: TrainConfig, device) -> list[Batch]:
    """A seeded sample of the training rows (the same on every rank), in micro-batches, for `init_t2s: auto`."""
    pick = np.sort(np.random.default_rng(tcfg.seed).choice(len(source), min(INIT_SAMPLE_ROWS, len(source)),
                                                           replace=False))
    m = tcfg.micro_batch_size
    return [source.collate(pick[i : i + m].tolist()).to(device) for i in range(0, len(pick), m)]


def _report_t2s_init(run_dir: Path, report: dict) -> None:
    """Say which t2s initialisation the run starts from, and why (<run>/t2s_init.json keeps it for `dskd report`)."""
    write_json(run_dir / T2S_INIT_FILE, report)
    r = report
    if "t2s_init_fit_ce" in r:
        plain = (f"; plain t2s_ce {r['t2s_init_plain_ce']:.3f}, agreement {r['t2s_init_plain_agreement']:.3f}"
                 if "t2s_init_plain_ce" in r else "")
        print(f"distill: t2s starts at the {'logit-identity fit' if r['t2s_init'] == 'fit' else 'plain init'} "
              f"(loss.init_t2s {str(r['init_t2s']).lower()}, {r['positions']} cached positions: fit t2s_ce "
              f"{r['t2s_init_fit_ce']:.3f}, agreement {r['t2s_init_fit_agreement']:.3f}{plain}; uniform "
              f"{r['uniform_ce']:.3f}, teacher {r['teacher_ce']:.3f}: the fit goes {100 * r['fit_gap_closed']:.0f}% of "
              "the way)")


def _diagnostics(compute: Objective, batch: Batch, side: StudentSide, normaliser, projectors,
                 alpha: float) -> dict[str, float]:
    """What a distillation run logs beside its terms: each term's gradient norm on the student's hidden states at
    the label positions, on its head and on t2s, and the projectors' norms. The objective runs once more on detached
    copies of the student's side (no backward through the body, none through the engine), at logged steps only."""
    leaf = detached_side(side)
    out = compute(batch, leaf, normaliser)
    wrt = {"hidden": leaf.hidden, "head": leaf.head.weight}
    if projectors is not None and hasattr(projectors, "t2s"):
        wrt["t2s"] = projectors.t2s.weight
    norms = term_grad_norms(out, alpha, {k: v for k, v in wrt.items() if v.requires_grad})  # LoRA: a frozen head
    for name in ("t2s", "s2t"):
        if projectors is not None and hasattr(projectors, name):
            norms[f"{name}_norm"] = float(getattr(projectors, name).weight.detach().norm())
    return norms


def _zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _offload(ds: dict) -> bool:
    z = ds.get("zero_optimization", {})
    return any(z.get(k, {}).get("device", "none") not in ("none", None) for k in ("offload_optimizer", "offload_param"))


def _optimizer(groups: list[dict], tcfg: TrainConfig, ds: dict):
    """AdamW; DeepSpeed's CPU Adam when ZeRO offloads the optimizer from a GPU (torch's on a CPU-only machine,
    where the states are on the CPU anyway and the JIT-built op would only add start-up time)."""
    if _offload(ds) and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), adamw_mode=True)
    ds["zero_force_ds_cpu_optimizer"] = False
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas))


def _check_finite_weights(module: torch.nn.Module, step: int, dist: DistInfo) -> None:
    """Refuse to save non-finite weights (each rank checks its ZeRO-3 partition or the whole tensors)."""
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(getattr(p, "ds_tensor", p)).all()]
    (n_bad,) = all_reduce_sum([len(bad)], dist.device)
    if n_bad:
        raise TrainingDiverged(f"step {step}: non-finite weights ({bad[:3]}) after the optimizer step; nothing was "
                               "saved for this step (lower train.lr or check the data)")


def run(cfg: DistillConfig, force: bool = False, resume: bool = False) -> Path:
    with contextlib.ExitStack() as held:  # the run directory's lock, from the first decision about it to the end
        return _run(cfg, force, resume, held)


def _run(cfg: DistillConfig, force: bool, resume: bool, held: contextlib.ExitStack) -> Path:
    tcfg = cfg.train
    # ---- checks that need no model and no process group, so that a mistake or an up-to-date run costs seconds:
    # processes, engine template, metric sinks, tokenizer, caches and data, the student's files, the run directory
    rank, world = env_rank_world()
    if tcfg.grad_accum % world:
        raise ConfigError(f"train.grad_accum {tcfg.grad_accum} is not divisible by {world} processes: the global batch "
                          f"is micro_batch_size x grad_accum on any number of processes, each takes grad_accum / "
                          f"{world} of the accumulation (set train.grad_accum to a multiple of {world})")
    accum = tcfg.grad_accum // world
    ds = deepspeed_config(tcfg, world)
    check_sinks(tcfg.report_to)
    # the caches' manifests or the data first (a wrong path or a bad row is the commonest mistake), then the
    # student's tokenizer
    reader = CacheReader(cfg.cache) if cfg.cache is not None else None
    valid_reader = CacheReader(cfg.valid.cache) if reader is not None and cfg.valid.enabled else None
    op_reader = CacheReader(cfg.onpolicy.cache) if cfg.onpolicy.cache is not None else None
    continue_state = None
    if cfg.continue_from is not None:
        try:
            continue_state = checkpoint.read_state(Path(cfg.continue_from))
        except (OSError, ValueError):
            raise ConfigError(f"continue_from: {cfg.continue_from} is not a complete checkpoint (no readable "
                              f"{checkpoint.STATE})") from None
        if continue_state.get("world_size") != world:
            raise ConfigError(f"continue_from: {cfg.continue_from} was saved by {continue_state.get('world_size')} "
                              f"process(es), this run has {world}; continue with the same number")
    examples = load_examples(cfg.data) if reader is None else None
    valid_examples = load_examples(cfg.valid.data)[: cfg.valid.max_rows] if reader is None and cfg.valid.enabled else None
    tokenizer = load_tokenizer(cfg.student_tokenizer or cfg.student)
    _, pad_id = special_ids(tokenizer)
    objective = cfg.loss.objective
    student_name = cfg.student_name or short_name(cfg.student)
    tok_fp = tokenizer_fingerprint(tokenizer)
    tok_ref = cfg.student_tokenizer or cfg.student  # what a cache for this student would be built with
    student_tok_set = " ".join(f"--set student_tokenizer.{k}={v}" for k, v in
                                (("path", tok_ref.path), ("gguf_file", tok_ref.gguf_file)) if v)
    source = valid_source = None
    if reader is not None:
        reader.check_student_tokenizer(tok_fp, student_tok_set)
        try:
            check_compatible(objective, reader.manifest.same_tokenizer, reader.manifest.embeddings_sha256 is not None,
                             str(reader.dir))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if cfg.loss.teacher_logits == "dense" and not reader.manifest.head_exact:
            raise ConfigError(f"{reader.dir}: the teacher's head could not be reproduced when the cache was built, so "
                              "it holds top-k + tail only; set loss.teacher_logits: sparse (or auto)")
        run_name = cfg.run_name or f"{reader.manifest.teacher_name}_to_{student_name}__{objective}"
        for other in (valid_reader, op_reader):
            if other is not None:
                other.check_student_tokenizer(tok_fp, student_tok_set)
                _same_teacher(reader, other)
        source_fp, valid_fp = reader.manifest.fingerprint, valid_reader.manifest.fingerprint if valid_reader else None
    else:
        run_name = cfg.run_name or f"{student_name}__sft"
        say = rank == 0  # truncation is reported once, by rank 0, naming the run (two SFT runs share their data)
        source = data_source(examples, tokenizer, cfg.tokenize, pad_id,
                             f"distill {run_name} ({cfg.data.path})" if say else "")
        if valid_examples is not None:
            valid_source = data_source(valid_examples, tokenizer, cfg.tokenize, pad_id,
                                       f"distill {run_name} valid ({cfg.valid.data.path})" if say else "")
        source_fp, valid_fp = source.fingerprint, valid_source.fingerprint if valid_source else None
    for what, n in ((f"cache {reader.dir}", len(reader)) if reader is not None else (f"data {cfg.data.path}", len(source)),
                    *(((f"onpolicy.cache {op_reader.dir}", len(op_reader)),) if op_reader else ())):
        if n < tcfg.micro_batch_size:  # with the data, before any engine starts
            raise ConfigError(f"{what}: {n} rows cannot fill one micro-batch of {tcfg.micro_batch_size} "
                              "(train.micro_batch_size)")
    if NEEDS_TEACHER[objective] and cfg.run_name is None and objective != "uld":
        run_name += f"_{cfg.loss.divergence}"
    check_model_ref(cfg.student)
    run_dir = Path(cfg.out_dir) / run_name
    held.enter_context(lock.writer(run_dir, "distill", take=rank == 0))  # one writer: before anything is read or removed
    # the run's identity; not the number of processes, which does not change the result (same global batch)
    fingerprint = hash_json({"config": config_identity(cfg), "source": source_fp, "valid": valid_fp,
                             "student": model_fingerprint(cfg.student),
                             **({"onpolicy": op_reader.manifest.fingerprint} if op_reader else {}),
                             **({"continue_from": continue_state["fingerprint"], "continue_step": continue_state["step"]}
                                if continue_state else {})})
    start_from = _prepare_run_dir(run_dir, fingerprint, cfg, force, resume)
    if start_from == "done":
        if rank == 0:
            stamps.record(Path(cfg.out_dir), stamps.quick_key(cfg, stamps.distill_inputs(cfg)),
                          {"dir": run_name, "fingerprint": fingerprint})
            print(f"distill: up to date ({run_dir})")
        return run_dir

    dist = init_distributed()
    if dist.device.type == "cpu":
        keep_freed_memory()
    if dist.is_main and start_from is None and run_dir.exists():  # forced, or unfinished without a checkpoint
        shutil.rmtree(run_dir)  # start over, never append
    teacher, vmap, op_source, op_stream = None, None, None, None
    if reader is not None:
        if NEEDS_TEACHER[objective]:
            teacher, vmap = _teacher_side(cfg, reader, tokenizer, dist.device)
        source = cache_source(reader, pad_id)
        if valid_reader is not None:
            valid_source = cache_source(valid_reader, pad_id, cfg.valid.max_rows)
    stream = MicroBatchStream(source.lengths, tcfg.micro_batch_size, tcfg.seed, group_by_length=tcfg.group_by_length)
    if op_reader is not None:  # the student's own samples, scored by the teacher (stage 1 over a rollout set)
        op_source = cache_source(op_reader, pad_id)
        op_stream = MicroBatchStream(op_source.lengths, tcfg.micro_batch_size, tcfg.seed + 1,
                                     group_by_length=tcfg.group_by_length)
        if teacher is not None:  # the recomputation check accepts what either cache's storage costs
            head_dtype = str(teacher.head.weight.dtype).removeprefix("torch.")
            teacher.check_tol = max(teacher.check_tol, recompute_tolerance(op_reader.manifest, head_dtype))
    barrier()
    if dist.is_main and start_from is None:
        run_dir.mkdir(parents=True)
        dump_config(cfg, run_dir / "config.yaml")

    # ---- model (+ LoRA), projectors, optimizer, schedule, engine
    random.seed(tcfg.seed + dist.rank)
    np.random.seed(tcfg.seed + dist.rank)
    torch.manual_seed(tcfg.seed + dist.rank)
    import deepspeed

    student = load_model(cfg.student, dtype="float32").train().to(dist.device)
    projectors = None
    if teacher is not None:
        scores = _scores_init(cfg, start_from)
        sample = _init_sample(source, tcfg, dist.device) if scores else []
        projectors = build_projectors(cfg.loss, student, teacher, vmap, sample, weights_follow=not scores)
        if projectors is not None and dist.is_main and start_from is None and cfg.continue_from is None:
            _report_t2s_init(run_dir, projectors.init_report)
    if cfg.lora.enabled:
        student = apply_lora(student, cfg.lora)
    if tcfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = StudentWithProjectors(student, projectors)
    optimizer = _optimizer(optimizer_groups(student, projectors, tcfg), tcfg, ds)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds)
    compute = Objective(cfg.loss, teacher, projectors, cfg.loss.chunk_positions)
    ce_only = Objective(dataclasses.replace(cfg.loss, objective="sft"), chunk_positions=cfg.loss.chunk_positions)
    validation = Validation(cfg, valid_source, tokenizer, dist, _zero_stage(ds)) if valid_source else None

    first, total = 1, float("nan")
    if start_from is None and cfg.continue_from is not None:  # weights, projectors and AdamW moments of a longer run
        checkpoint.load_weights_and_optimizer(engine, Path(cfg.continue_from), strict=not cfg.lora.enabled)
        for group, lr, base in zip(optimizer.param_groups, scheduler.get_last_lr(), scheduler.base_lrs):
            group.update(lr=lr, initial_lr=base)  # this run's schedule, not the saved run's last learning rate
        if dist.is_main:
            print(f"distill: continuing from {cfg.continue_from} (weights, projectors, optimizer state)")
    if isinstance(start_from, Path):
        state = checkpoint.load(engine, start_from, dist, strict=not cfg.lora.enabled)
        first, total = state["step"] + 1, state["metrics"]["train_loss"]
        if dist.is_main:
            print(f"distill: resuming {run_name} after step {state['step']} ({start_from})")

    def write_student(where: Path, name: str = "student") -> None:
        """The student (and projectors) into `where` (collective under ZeRO-3; rank 0 writes)."""
        with gathered(engine.module.parameters()):
            if dist.is_main:
                save_student(engine.module.student, where / name, tokenizer, cfg.student)
                if projectors is not None:
                    atomic_save_safetensors(where / PROJECTORS_FILE,
                                            {k: v.detach().contiguous() for k, v in projectors.state_dict().items()})

    def save_checkpoint(step: int, metrics: dict) -> None:
        _check_finite_weights(engine.module, step, dist)
        state = {"fingerprint": fingerprint, "micro_batches": step * tcfg.grad_accum,
                 "metrics": metrics}
        checkpoint.save(engine, run_dir, step, state, dist, write_student, exclude_frozen=cfg.lora.enabled)
        if dist.is_main:
            best = checkpoint.prune(run_dir, cfg.checkpoint.keep_best, cfg.checkpoint.metric)
            if best:
                write_json(run_dir / "best.json", {"metric": cfg.checkpoint.metric, "checkpoints": [p.name for p in best]})

    # ---- training loop: batch -> forward -> objective -> backward -> step -> log -> validate -> checkpoint
    log = MetricsLog(run_dir, run_name, config_to_dict(cfg), tcfg.report_to, first - 1 if first > 1 else None) \
        if dist.is_main else None
    bar = tqdm(total=tcfg.steps, initial=first - 1, desc=f"distill {run_name}", disable=not dist.is_main, mininterval=2.0)
    t_start = time.perf_counter()
    try:  # the bar and the metrics file are closed whatever happens (no stray bar after an error)
        for step in range(first, tcfg.steps + 1):
            t0 = time.perf_counter()
            # the data order of a longer run continues after train.step_offset steps (on-policy rounds)
            data_step = step + tcfg.step_offset
            micro = [source.collate(idx) for idx in stream.for_step(data_step, dist.rank, dist.world_size, accum)]
            # on-policy: the micro-batches (by global index, so any world size draws alike) whose KD term is computed
            # on a micro-batch of the student's own samples instead of the gold one
            first_k = (data_step - 1) * accum * dist.world_size + dist.rank * accum
            kd_micro = [op_source.collate(op_stream[k]) if on_policy(tcfg.seed, k, cfg.onpolicy.mix) else None
                        for k in range(first_k, first_k + accum)] if op_stream is not None else [None] * accum
            local_tokens = sum(b.n_tokens for b in micro)
            local_kd = sum((o or b).n_tokens for b, o in zip(micro, kd_micro))
            global_tokens, global_kd = all_reduce_sum([local_tokens, local_kd], dist.device)
            normaliser = token_normaliser(int(global_tokens), accum, dist.world_size)
            kd_normaliser = token_normaliser(int(global_kd), accum, dist.world_size)
            sums: dict[str, float] = {}
            worst: dict[str, float] = {}
            seen_tokens = 0
            last = step == tcfg.steps
            logged = step % tcfg.log_every == 0 or step == 1 or last
            diag: dict[str, float] = {}
            for batch, kd_batch in zip(micro, kd_micro):
                batch = batch.to(dist.device)
                hidden = engine(batch.input_ids, batch.attention_mask)
                if op_stream is None:
                    side = student_side(engine.module.student, batch, hidden)
                    # this rank's first micro-batch; not under ZeRO-3, whose partitioned head is gathered only
                    # inside the engine's own passes
                    if teacher is not None and logged and not diag and _zero_stage(ds) < 3:
                        diag = _diagnostics(compute, batch, side, normaliser, projectors, cfg.loss.alpha)
                    out = compute(batch, side, normaliser)
                else:
                    out = _mixed(engine, compute, ce_only, cfg.loss.alpha, batch, hidden, kd_batch, normaliser,
                                 kd_normaliser, dist.device)
                if not torch.isfinite(out.loss):
                    bad = [k for k, v in out.terms.items() if not torch.isfinite(v)] or ["loss"]
                    last_ckpt = checkpoint.latest(run_dir)
                    raise TrainingDiverged(f"step {step}: non-finite {', '.join(bad)} (rows {batch.ids[:4]}); nothing was "
                                           "saved for this step" + (f", the last checkpoint is {last_ckpt}" if last_ckpt else ""))
                engine.backward(out.loss)
                boundary = engine.is_gradient_accumulation_boundary()
                engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
                if boundary and projectors is not None:
                    projectors.head_updated()
                for k, v in [("loss", out.loss), *out.terms.items()]:
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                for k, v in out.stats.items():
                    worst[k] = max(worst.get(k, v), v) if k == "teacher_max_err" else worst.get(k, 0.0) + v
                seen_tokens += int(batch.attention_mask.sum())

            # each term is (sum over the micro-batch) / N-bar: their mean over micro-batches and ranks is a token mean
            names, stat_names = sorted(sums), sorted(k for k in worst if k != "teacher_max_err")
            reduced = all_reduce_sum([sums[k] for k in names] + [worst[k] for k in stat_names] + [seen_tokens], dist.device)
            n_micro = tcfg.grad_accum
            per_token = {k: v / n_micro for k, v in zip(names, reduced)}
            stats = {k: v / n_micro for k, v in zip(stat_names, reduced[len(names) :])}
            if "teacher_max_err" in worst:  # this rank's worst recomputation error
                stats["teacher_max_err"] = worst["teacher_max_err"]
            total = per_token["loss"]
            step_s = time.perf_counter() - t0
            tok_s = reduced[-1] / step_s

            ckpt_now = cfg.checkpoint.keep_at_end if last else cfg.checkpoint.every > 0 and step % cfg.checkpoint.every == 0
            valid = validation(engine, compute) if validation and (ckpt_now or last or step % cfg.valid.every == 0) else {}
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
            if log is not None and (logged or valid):
                log.write({"step": step, **per_token, **stats, **diag, **valid, "lr": scheduler.get_last_lr()[0],
                           "tokens_per_s": tok_s, "step_s": step_s, "loss_tokens": int(global_tokens),
                           **peak_memory_mb(dist.device), "elapsed_s": time.perf_counter() - t_start})
            if ckpt_now:
                save_checkpoint(step, {"train_loss": total, **valid})
    finally:
        bar.close()
        if log is not None:
            log.close()

    # ---- the final student: an HF directory (or LoRA adapter) that from_pretrained loads; done.json last
    if dist.is_main:
        for stale in run_dir.glob(f"{FINAL_TMP}*"):  # left by a run killed while saving its final student
            shutil.rmtree(stale)
    barrier()
    final, error = run_dir / "final", None
    try:
        write_student(run_dir, FINAL_TMP)
        if dist.is_main:
            tmp = run_dir / FINAL_TMP
            if cfg.lora.enabled and cfg.lora.save == "merged":  # base + the saved adapter, merged: what a user reloads
                merged = run_dir / f"{FINAL_TMP}-merged"
                save_student(load_model(ModelRef(path=str(tmp))), merged, tokenizer, cfg.student)
                shutil.rmtree(tmp)
                tmp = merged
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except Exception as e:  # any error: no temporary is left, the last checkpoint stays the way back
        error = e
    (failed,) = all_reduce_sum([float(error is not None)], dist.device)
    if failed:
        if dist.is_main:
            for stale in run_dir.glob(f"{FINAL_TMP}*"):
                shutil.rmtree(stale, ignore_errors=True)
        why = f"{type(error).__name__}: {error}" if error is not None else "another rank failed"
        raise checkpoint.CheckpointError(f"writing the final student {final}: {why}; nothing was left half-written "
                                         f"and {checkpoint.latest(run_dir)} is intact") from error
    if dist.is_main:
        write_json(run_dir / DONE, {"fingerprint": fingerprint, "steps": tcfg.steps, "final_loss": total,
                                    "wall_s": time.perf_counter() - t_start})
        stamps.record(Path(cfg.out_dir), stamps.quick_key(cfg, stamps.distill_inputs(cfg)),
                      {"dir": run_name, "fingerprint": fingerprint})
        if not cfg.checkpoint.keep_at_end:  # after done.json: a kill in between leaves a finished run with checkpoints
            shutil.rmtree(run_dir / checkpoint.CHECKPOINTS, ignore_errors=True)
        print(f"distill: {tcfg.steps} steps, final loss {total:.4f}, student in {final}")
    barrier()
    return run_dir
