"""Stage 2, `distill`: train the student under DeepSpeed from a teacher cache (or plain SFT from jsonl).

The teacher model is never loaded here: every objective (pipeline/objectives.py) reads the teacher's hidden states,
top-k and alignments from the cache and its head (and input embeddings for CMA) from the files saved with it; dense
teacher logits are checked against the cached top-k on every batch. The engine trains the student and the
objective's projectors (their own learning rate). Outputs in <out_dir>/<run name>/: config.yaml (resolved),
metrics.jsonl, final/ (an HF checkpoint with its tokenizer), projectors.safetensors (DSKD objectives), done.json
(written last).
A run whose done.json records the same fingerprint is skipped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.alignment import edit_distance_vocab_map
from pipeline.batch import Batch, collate_cache_rows, collate_examples
from pipeline.cache_io import CacheReader
from pipeline.cache_schema import recompute_tolerance
from pipeline.config import ConfigError, DistillConfig, ModelRef, TrainConfig, config_to_dict, dump_config
from pipeline.data import load_examples
from pipeline.distributed import DistInfo, all_reduce_sum, init_distributed
from pipeline.io_utils import atomic_save_safetensors, hash_json, write_json
from pipeline.losses import token_normaliser
from pipeline.models import (
    StudentWithProjectors,
    load_model,
    load_tokenizer,
    model_fingerprint,
    short_name,
    tokenizer_fingerprint,
)
from pipeline.objectives import (
    NEEDS_EMBEDDINGS,
    NEEDS_TEACHER,
    Objective,
    TeacherSide,
    build_projectors,
    check_compatible,
    student_side,
)
from pipeline.tokenize import encode, special_ids, token_surfaces

DONE = "done.json"
PROJECTORS_FILE = "projectors.safetensors"


# --------------------------------------------------------------------------------------------------------------
# Set-up helpers


def deepspeed_config(train: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON template with batch, accumulation, clipping and precision filled from the run config."""
    ds = json.loads(Path(train.deepspeed).read_text())
    ds.update(
        train_micro_batch_size_per_gpu=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        train_batch_size=train.micro_batch_size * train.grad_accum * world_size,
        gradient_clipping=train.grad_clip,
        steps_per_print=10**9,
    )
    ds["bf16"] = {"enabled": train.precision == "bf16"}
    ds["fp16"] = {"enabled": train.precision == "fp16"}
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms (1-D) and nothing frozen."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine from lr to min_lr over the remaining steps (a factor of lr)."""

    def f(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        floor = train.min_lr / train.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def micro_batches(n: int, cfg: TrainConfig, dist: DistInfo, collate: Callable[[list[int]], Batch]) -> Iterator[Batch]:
    """Endless micro-batches: a seeded permutation per epoch, each rank taking its own slice."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        mine = torch.randperm(n, generator=g)[dist.rank :: dist.world_size].tolist()
        for i in range(0, len(mine) - cfg.micro_batch_size + 1, cfg.micro_batch_size):
            yield collate(mine[i : i + cfg.micro_batch_size])
        epoch += 1


def _teacher_side(cfg: DistillConfig, reader: CacheReader, student_tok, device) -> tuple[TeacherSide, np.ndarray | None]:
    """The teacher's frozen pieces from the cache, after checking the cache can serve the objective."""
    m, objective = reader.manifest, cfg.loss.objective
    where = str(reader.dir)
    try:
        check_compatible(objective, m.same_tokenizer, m.embeddings_sha256 is not None, where)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mode = cfg.loss.teacher_logits
    if mode == "dense" and not m.head_exact:
        raise ConfigError(f"{where}: the teacher's head could not be reproduced when the cache was built, so it holds "
                          "top-k + tail only; set loss.teacher_logits: sparse (or auto)")
    vmap = None if m.same_tokenizer else reader.vocab_map()
    teacher = TeacherSide(
        head=reader.load_head(device),
        dense=m.head_exact if mode == "auto" else mode == "dense",
        check_tol=recompute_tolerance(m, cfg.train.teacher_check_tol),
        embeddings=reader.load_embeddings().to(device) if objective in NEEDS_EMBEDDINGS else None,
    )
    if objective == "mined":
        teacher_tok = load_tokenizer(ModelRef(path=str(reader.dir / "teacher_tokenizer")))
        mined = edit_distance_vocab_map(token_surfaces(teacher_tok), token_surfaces(student_tok), vmap)
        teacher.mined_map = torch.from_numpy(mined).long().to(device)
    return teacher, vmap


# --------------------------------------------------------------------------------------------------------------


def run(cfg: DistillConfig, force: bool = False) -> Path:
    dist = init_distributed()
    tcfg = cfg.train
    tokenizer = load_tokenizer(cfg.student_tokenizer or cfg.student)
    _, pad_id = special_ids(tokenizer)
    objective = cfg.loss.objective
    student_name = cfg.student_name or short_name(cfg.student)

    # ---- data source: a teacher cache, or tokenized examples for plain SFT
    teacher, vmap = None, None
    if cfg.cache is not None:
        reader = CacheReader(cfg.cache, expect_student_tokenizer=tokenizer_fingerprint(tokenizer))
        manifest = reader.manifest
        if NEEDS_TEACHER[objective]:
            teacher, vmap = _teacher_side(cfg, reader, tokenizer, dist.device)
        n_rows = len(reader)
        source_fp = manifest.fingerprint
        run_name = cfg.run_name or f"{manifest.teacher_name}_to_{student_name}__{objective}"

        def collate(idx: list[int]) -> Batch:
            return collate_cache_rows([reader[i] for i in idx], pad_id)
    else:
        if NEEDS_TEACHER[objective]:
            raise ConfigError(f"objective {objective!r} needs a teacher cache (set cache:)")
        examples = load_examples(cfg.data)
        encoded = [(e.id, encode(tokenizer, e.prompt, e.response, cfg.tokenize)) for e in examples]
        n_rows = len(encoded)
        source_fp = hash_json([[i, e.ids, e.response_start] for i, e in encoded])
        run_name = cfg.run_name or f"{student_name}__sft"

        def collate(idx: list[int]) -> Batch:
            return collate_examples([encoded[i] for i in idx], pad_id)

    if NEEDS_TEACHER[objective] and cfg.run_name is None and objective != "uld":
        run_name += f"_{cfg.loss.divergence}"
    if n_rows < tcfg.micro_batch_size * dist.world_size:
        raise ConfigError(f"{n_rows} rows cannot fill one micro-batch of {tcfg.micro_batch_size} on {dist.world_size} rank(s)")

    # ---- skip when this exact run already finished
    run_dir = Path(cfg.out_dir) / run_name
    fingerprint = hash_json({"config": config_to_dict(cfg), "source": source_fp, "student": model_fingerprint(cfg.student)})
    done = run_dir / DONE
    if done.exists() and not force:
        if json.loads(done.read_text()).get("fingerprint") == fingerprint:
            if dist.is_main:
                print(f"distill: up to date ({run_dir})")
            return run_dir
        raise ConfigError(
            f"{run_dir} holds a finished run with another config or data; set run_name, delete it, or pass --force"
        )
    if dist.is_main:
        if run_dir.exists():  # an unfinished or forced run: start over, never append to its files
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        dump_config(cfg, run_dir / "config.yaml")

    # ---- model, optimizer, schedule, engine
    random.seed(tcfg.seed + dist.rank)
    np.random.seed(tcfg.seed + dist.rank)
    torch.manual_seed(tcfg.seed + dist.rank)
    import deepspeed

    student = load_model(cfg.student, dtype="float32").train().to(dist.device)
    projectors = build_projectors(cfg.loss, student, teacher, vmap) if teacher is not None else None
    module = StudentWithProjectors(student, projectors)
    groups = param_groups(student, tcfg.weight_decay)
    if projectors is not None:
        groups.append({"params": list(projectors.parameters()), "lr": tcfg.projector_lr, "weight_decay": tcfg.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg))
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(tcfg, dist.world_size)
    )
    compute = Objective(cfg.loss, teacher, projectors, cfg.loss.chunk_positions)

    # ---- training loop: batch -> forward -> objective -> backward -> step -> log
    batches = micro_batches(n_rows, tcfg, dist, collate)
    metrics = open(run_dir / "metrics.jsonl", "w") if dist.is_main else None
    bar = tqdm(total=tcfg.steps, desc=f"distill {run_name}", disable=not dist.is_main, mininterval=2.0)
    t_start = time.perf_counter()
    for step in range(1, tcfg.steps + 1):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(tcfg.grad_accum)]
        local_tokens = sum(b.n_tokens for b in micro)
        (global_tokens,) = all_reduce_sum([local_tokens], dist.device)
        normaliser = token_normaliser(int(global_tokens), tcfg.grad_accum, dist.world_size)
        sums: dict[str, float] = {}
        worst: dict[str, float] = {}
        seen_tokens = 0
        for batch in micro:
            batch = batch.to(dist.device)
            hidden = engine(batch.input_ids, batch.attention_mask)
            out = compute(batch, student_side(engine.module.student, batch, hidden), normaliser)
            if not torch.isfinite(out.loss):
                bad = [k for k, v in out.terms.items() if not torch.isfinite(v)]
                raise FloatingPointError(f"step {step}: non-finite loss (terms {bad}) in rows {batch.ids[:4]}")
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            for k, v in [("loss", out.loss), *out.terms.items()]:
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            for k, v in out.stats.items():
                worst[k] = max(worst.get(k, v), v) if k == "teacher_max_err" else worst.get(k, 0.0) + v
            seen_tokens += int(batch.attention_mask.sum())

        # each term is (sum over the micro-batch) / N-bar: their mean over micro-batches and ranks is a token mean
        names, stat_names = sorted(sums), sorted(k for k in worst if k != "teacher_max_err")
        reduced = all_reduce_sum([sums[k] for k in names] + [worst[k] for k in stat_names] + [seen_tokens], dist.device)
        n_micro = tcfg.grad_accum * dist.world_size
        per_token = {k: v / n_micro for k, v in zip(names, reduced)}
        stats = {k: v / n_micro for k, v in zip(stat_names, reduced[len(names) :])}
        if "teacher_max_err" in worst:  # this rank's worst recomputation error
            stats["teacher_max_err"] = worst["teacher_max_err"]
        total = per_token["loss"]
        tok_s = reduced[-1] / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
        if metrics is not None and (step % tcfg.log_every == 0 or step == 1 or step == tcfg.steps):
            row = {"step": step, **per_token, **stats, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s,
                   "loss_tokens": int(global_tokens), "elapsed_s": time.perf_counter() - t_start}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
    bar.close()

    # ---- checkpoint: an HF directory that from_pretrained loads; done.json last
    if dist.is_main:
        metrics.close()
        final = run_dir / "final"
        engine.module.student.save_pretrained(final)
        tokenizer.save_pretrained(final)
        if projectors is not None:  # beside the student: not part of the HF checkpoint
            atomic_save_safetensors(run_dir / PROJECTORS_FILE, {k: v.contiguous() for k, v in projectors.state_dict().items()})
        write_json(done, {"fingerprint": fingerprint, "steps": tcfg.steps, "final_loss": total,
                          "wall_s": time.perf_counter() - t_start})
        print(f"distill: {tcfg.steps} steps, final loss {total:.4f}, student in {final}")
    return run_dir
