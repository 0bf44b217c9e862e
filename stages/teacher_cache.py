"""Stage 1, `teacher-cache`: run the teacher once over the data and write the sharded Arrow cache.

data -> [loader worker: tokenize for the teacher, sort by length] -> batched teacher forward -> [writer thread:
encode hidden states, Arrow shard (tmp + rename)] -> manifest -> (a student tokenizer other than the teacher's) its
student view (pipeline/cache/views.py, no model). The worker prepares shard i+1 and the writer writes
shard i-1 while the teacher runs on shard i. Ranks of a `torchrun` launch take shards i = rank (mod world); rank 0
writes the once-per-cache files and the manifest. A finished cache with the same fingerprint is left alone; an
unfinished one is resumed (shards already on disk are skipped); another fingerprint gets its own directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import lock, stamps
from pipeline.cache import views
from pipeline.cache.schema import (
    CHANNEL_SCALE_FILE,
    CURRENT,
    DATA_FILE,
    EMBEDDINGS_FILE,
    MANIFEST,
    SCHEMA_VERSION,
    SHARD_PATTERN,
    STORAGE_META,
    TEACHER_TOKENIZER,
    StorageError,
    arrow_schema,
    decode_hidden,
    encode_hidden,
    fit_channel_scale,
    float32_rows,
    list_column,
    stored_finite,
)
from pipeline.cache.store import (
    CacheError,
    CacheWriter,
    cache_dir_name,
    file_problems,
    read_manifest,
    shard_metadata,
)
from pipeline.cache.teacher import check_head, every_hidden, stage1_chunk_positions, teacher_forward
from pipeline.config import (
    DataConfig,
    TeacherCacheConfig,
    TokenizeConfig,
    config_to_dict,
    dump_config,
    load_config,
)
from pipeline.cpu import keep_freed_memory
from pipeline.data.alignment import encode_teacher
from pipeline.data.records import Example, load_examples, write_jsonl
from pipeline.data.tokenize import Encoded, TokenizerError, Truncation, encode, special_ids
from pipeline.io_utils import atomic_save_npy, atomic_save_safetensors, hash_json, sha256_file, write_json
from pipeline.losses import divergence
from pipeline.models.head import HEAD_FILE, HEAD_TOLERANCE, OutputHead
from pipeline.models.load import (
    checkpoint_dtype,
    load_model,
    load_tokenizer,
    model_fingerprint,
    save_tokenizer,
    short_name,
    tokenizer_fingerprint,
)
from pipeline.train.distributed import all_reduce_sum, barrier, local_or_distributed
from pipeline.train.tracking import peak_memory_mb

# this run's throughput (rank 0's tokens and seconds); informational, not part of the cache's identity
STATS_FILE = "build_stats.json"
# positions per shard (from its first batch) on which the KL against the exact hidden states is measured: at most
# KL_SAMPLE, and at most 1/KL_SHARE of the shard's response positions (a one-head product each: a small shard's
# sample would otherwise cost as much as its head)
KL_SAMPLE = 128
KL_SHARE = 16
# rows of the data the head check runs on
HEAD_CHECK_ROWS = 8


def kl_sample_size(positions: int) -> int:
    """Positions of a shard with `positions` response positions on which the storage KL is measured (>= 1)."""
    return max(1, min(KL_SAMPLE, positions // KL_SHARE))


# --------------------------------------------------------------------------------------------------------------
# Preparation (runs in the data-loader worker)


@dataclass
class PreparedShard:
    index: int
    rows: list[Example]
    teacher: list[Encoded]
    batches: list[list[int]]  # row indices per teacher forward, sorted by teacher length
    truncation: Truncation = field(default_factory=Truncation)  # rows cut to fit
    error: str | None = None


class ShardPreparer(Dataset):
    def __init__(self, examples, shards, rows_per_shard, batch_size, teacher_tok, student_tok, tok_cfg, where):
        self.examples, self.shards, self.R, self.batch_size = examples, shards, rows_per_shard, batch_size
        self.teacher_tok, self.student_tok, self.tok_cfg, self.where = teacher_tok, student_tok, tok_cfg, where

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, k: int) -> PreparedShard:
        index = self.shards[k]
        rows = self.examples[index * self.R : (index + 1) * self.R]
        try:
            return prepare_shard(index, rows, self.teacher_tok, self.student_tok, self.tok_cfg, self.batch_size)
        except TokenizerError as e:  # returned, not raised: a worker's exception would arrive wrapped in a traceback
            return PreparedShard(index, rows, [], [], error=f"{self.where}: {e}")


def prepare_shard(
    index: int, rows: list[Example], teacher_tok, student_tok, tok_cfg: TokenizeConfig, batch_size: int
) -> PreparedShard:
    """The teacher's side of a shard's rows (`student_tok`: the tokenizer generated rows were sampled with, when it
    is not the teacher's)."""
    t_enc, cut = [], Truncation()
    for e in rows:
        t_enc.append(encode_teacher(e, teacher_tok, student_tok, tok_cfg))
        cut.add_encoded(e.id, t_enc[-1], tok_cfg)
    # batches of similar length waste little compute on padding; rows are written back in data order
    order = sorted(range(len(rows)), key=lambda i: len(t_enc[i].ids))
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    return PreparedShard(index, rows, t_enc, batches, cut)


def _identity(x):
    return x


# --------------------------------------------------------------------------------------------------------------
# Stage


def fingerprint_of(cfg: TeacherCacheConfig, examples: list[Example], teacher_tok) -> dict:
    """What identifies a cache: every input that changes its rows, never a student (generated rows name the
    tokenizer they were sampled with in the data's hash)."""
    encoding = "int8" if cfg.cache.mode == "compact" else (
        cfg.teacher.dtype if cfg.cache.hidden_dtype == "auto" else cfg.cache.hidden_dtype
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "teacher": model_fingerprint(cfg.teacher),
        "teacher_tokenizer": tokenizer_fingerprint(teacher_tok),
        "data": hash_json([[e.id, e.prompt, e.response] + ([list(e.prompt_ids), list(e.response_ids), e.tokenizer]
                                                            if e.generated else []) for e in examples]),
        "tokenize": config_to_dict(cfg.tokenize),
        "top_k": cfg.cache.top_k,
        "hidden_encoding": encoding,
        "store_embeddings": cfg.cache.store_embeddings,
        "rows_per_shard": cfg.cache.rows_per_shard,
    }


def run(cfg: TeacherCacheConfig, *, repair: bool = False, expect_dir: Path | None = None) -> Path:
    """Build (or resume, or repair) the cache of `cfg`; return its directory. With `repair`, a finished cache's
    shards are checked by sha256 (not only by size) and the bad ones recomputed; `expect_dir` refuses to build any
    other directory (`repair`). Plan (the cheap checks), then, if there is work: the teacher, the once-per-cache
    files, the shards, the manifest. Then, for a student tokenizer other than the teacher's, its student view
    (built if missing, repaired with `repair`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader worker is a forked process
    with contextlib.ExitStack() as held:  # the cache directory's lock, from the first decision about it to the end
        dist = local_or_distributed()
        if dist.device.type == "cpu":
            keep_freed_memory()
        p = plan(cfg, expect_dir)
        held.enter_context(lock.writer(p.out, "teacher-cache", take=dist.is_main))  # one writer, before anything is read
        work = p.writer.needs_work(repair, lambda m, deep: file_problems(p.out, _once_files(m), deep)) \
            if dist.is_main else False
        (work,) = all_reduce_sum([float(work)], dist.device)
        if not work:
            if dist.is_main:
                p.writer.mark_current()
                print(f"teacher-cache: up to date ({p.out})")
                _record(cfg, p.writer, read_manifest(p.out), _student_view(p, repair))
            return p.out
        t = load_teacher(cfg, p, dist)
        if dist.is_main:
            _write_once_files(cfg, p, t)
        barrier()
        tokens, elapsed, todo = _compute_shards(cfg, p, t, dist)
        if dist.is_main:  # throughput of this run's loop (first preparation and last write included)
            write_json(p.out / STATS_FILE, {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
                                            "world_size": dist.world_size, "shards": len(todo),
                                            **peak_memory_mb(dist.device)})
        barrier()
        if dist.is_main:
            _finish(cfg, p, t, dist)
        return p.out


@dataclass
class Plan:
    """What the cheap checks found: the data, both tokenizers, the cache's identity and its directory."""

    examples: list[Example]
    teacher_tok: object
    student_tok: object
    t_pad: int
    fingerprint_inputs: dict
    same: bool  # one tokenizer on both sides (no student view)
    student_fingerprint: str
    encoding: str  # how hidden states are stored
    teacher_name: str
    writer: CacheWriter
    rows_per_shard: int

    @property
    def out(self) -> Path:
        return self.writer.dir

    @property
    def n_shards(self) -> int:
        return (len(self.examples) + self.rows_per_shard - 1) // self.rows_per_shard


def plan(cfg: TeacherCacheConfig, expect_dir: Path | None) -> Plan:
    """The data, then the tokenizers (a converted GGUF vocabulary loads in about a second), then the cache's
    fingerprint and directory: seconds, before any model."""
    examples = load_examples(cfg.data)
    teacher_tok = load_tokenizer(cfg.teacher_tokenizer or cfg.teacher)
    student_tok = load_tokenizer(cfg.student_tokenizer) if cfg.student_tokenizer else teacher_tok
    _, t_pad = special_ids(teacher_tok, require_eos=False)
    special_ids(student_tok)  # a student tokenizer without EOS is an error here, before any work
    inputs = fingerprint_of(cfg, examples, teacher_tok)
    fingerprint = hash_json(inputs)
    student_fp = tokenizer_fingerprint(student_tok)
    _check_generated(examples, student_fp, cfg)
    teacher_name = cfg.teacher_name or short_name(cfg.teacher)
    writer = CacheWriter(Path(cfg.out_dir), cache_dir_name(teacher_name, fingerprint), fingerprint)
    if expect_dir is not None and writer.dir.resolve() != Path(expect_dir).resolve():
        raise CacheError(f"{expect_dir}: its config.yaml no longer reproduces it (the teacher, the tokenizers or the "
                         f"data changed: it would build {writer.dir.name}); rebuild with `dskd teacher-cache`")
    return Plan(examples, teacher_tok, student_tok, t_pad, inputs, student_fp == inputs["teacher_tokenizer"], student_fp,
                inputs["hidden_encoding"], teacher_name, writer, cfg.cache.rows_per_shard)


@dataclass
class Teacher:
    """The loaded teacher, its output head and what the head check found."""

    model: torch.nn.Module
    head: OutputHead
    k: int  # top-k stored
    check_rows: list[list[int]]
    head_err: float
    head_exact: bool  # the head reproduces the model's logits: stage 2 may recompute them densely


def load_teacher(cfg: TeacherCacheConfig, p: Plan, dist) -> Teacher:
    model = load_model(cfg.teacher).to(dist.device)
    head = OutputHead.from_model(model)
    check_rows = [encode(p.teacher_tok, e.prompt, e.response, cfg.tokenize, require_eos=False).ids
                  for e in p.examples[:HEAD_CHECK_ROWS]]
    head_err = check_head(model, head, check_rows, p.t_pad)
    # above the tolerance the cache falls back to top-k + tail
    head_exact = head_err <= HEAD_TOLERANCE[checkpoint_dtype(model)]
    if not head_exact and dist.is_main:
        print(
            f"teacher-cache: WARNING: the output head does not reproduce {cfg.teacher.path!r}'s logits (max error "
            f"{head_err:.3g}); falling back to top-k + tail from the model's own logits (stage 2 cannot recompute them)"
        )
    return Teacher(model, head, min(cfg.cache.top_k, head.vocab_size), check_rows, head_err, head_exact)


def _write_once_files(cfg: TeacherCacheConfig, p: Plan, t: Teacher) -> None:
    """Rank 0: the once-per-cache files (deterministic: a resume or a repair writes the same bytes)."""
    out = p.out
    p.writer.begin()
    t.head.save(out / HEAD_FILE)
    if cfg.cache.store_embeddings:
        _save_embeddings(t.model, out / EMBEDDINGS_FILE)
    save_tokenizer(p.teacher_tok, out / TEACHER_TOKENIZER)
    write_jsonl(out / DATA_FILE, [e.record() for e in p.examples])
    if not (out / "config.yaml").exists():  # a repair keeps the config the cache was built with
        dump_config(cfg, out / "config.yaml")
    if p.encoding == "int8" and not (out / CHANNEL_SCALE_FILE).exists():  # fitted once: a resume reuses it
        atomic_save_npy(out / CHANNEL_SCALE_FILE, fit_channel_scale(every_hidden(t.model, t.check_rows, p.t_pad)))
    p.writer.complete_shards(p.n_shards)


def _compute_shards(cfg: TeacherCacheConfig, p: Plan, t: Teacher, dist) -> tuple[int, float, list[int]]:
    """This rank's missing shards: prepared by the loader worker, the teacher's forward here, written by the writer
    thread. Returns (tokens, seconds, the shards computed)."""
    channel_scale = np.load(p.out / CHANNEL_SCALE_FILE) if p.encoding == "int8" else None
    R, examples = cfg.cache.rows_per_shard, p.examples
    done = p.writer.present_shards()  # checked by rank 0 above: readable, and this cache's own
    todo = [i for i in range(p.n_shards) if i % dist.world_size == dist.rank and i not in done]
    if done and dist.is_main:
        print(f"teacher-cache: resuming, {len(done)} of {p.n_shards} shard(s) already complete")
    schema = arrow_schema(t.head.hidden_size, t.k, p.encoding)
    preparer = ShardPreparer(examples, todo, R, cfg.cache.batch_size, p.teacher_tok, None if p.same else p.student_tok,
                             cfg.tokenize, str(cfg.data.path))
    workers = cfg.cache.loader_workers
    if workers is None:  # CacheSettings.loader_workers: a process beside a GPU teacher, inline beside a CPU one
        workers = 1 if dist.device.type == "cuda" else 0
    loader = DataLoader(preparer, batch_size=None, collate_fn=_identity, num_workers=workers,
                        prefetch_factor=2 if workers else None)
    cut = Truncation()
    bar = tqdm(total=sum(len(examples[i * R : (i + 1) * R]) for i in todo), unit="row",
               desc=f"teacher-cache[{dist.rank}]" if dist.world_size > 1 else "teacher-cache", mininterval=2.0,
               disable=not dist.is_main)
    tokens, t0 = 0, time.perf_counter()
    pending: Future | None = None
    with bar, ThreadPoolExecutor(max_workers=1) as pool:  # the bar closes on errors too
        for prep in loader:
            if prep.error:
                raise TokenizerError(prep.error)
            cut.merge(prep.truncation)
            outputs: list = [None] * len(prep.rows)
            err = StorageError()
            sample = kl_sample_size(sum(len(e.ids) - e.response_start for e in prep.teacher))
            for b, idx in enumerate(prep.batches):
                seqs = [prep.teacher[i].ids for i in idx]
                starts = [prep.teacher[i].response_start for i in idx]
                results = teacher_forward(t.model, t.head, seqs, starts, t.k, p.t_pad, head_exact=t.head_exact,
                                          keep_logits=sample if b == 0 and t.head_exact else 0)
                if t.head_exact:  # what storing the hidden states costs: stage 2's check is derived from it
                    err.merge(_storage_error(t.head, results, p.encoding, channel_scale, sample if b == 0 else 0))
                for r in results:  # the sample's logits are not kept with the shard
                    r.logits = None
                for i, r in zip(idx, results):
                    outputs[i] = r
                tokens += sum(len(s) - 1 for s in seqs)
                bar.update(len(idx))
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}", refresh=False)
            if pending is not None:
                pending.result()  # at most one shard in flight: bounded memory, errors surface promptly
            pending = pool.submit(_write_shard, p.writer, schema, prep, outputs, p.encoding, channel_scale, err)
        if pending is not None:
            pending.result()
    # once, for people: a 100k-character prompt is not cut silently
    if msg := cut.message(cfg.tokenize, f"teacher-cache[{dist.rank}]" if dist.world_size > 1 else "teacher-cache"):
        print(msg)
    return tokens, time.perf_counter() - t0, todo


def _finish(cfg: TeacherCacheConfig, p: Plan, t: Teacher, dist) -> None:
    """Rank 0: the manifest (the commit of the whole cache), the student view, and the quick up-to-date record."""
    out, inputs = p.out, p.fingerprint_inputs
    manifest = p.writer.finish(
        {
            "fingerprint_inputs": inputs,
            "teacher_name": p.teacher_name,
            "teacher_vocab_size": t.head.vocab_size,
            "hidden_size": t.head.hidden_size,
            "mode": cfg.cache.mode,
            "hidden_encoding": p.encoding,
            "top_k": t.k,
            "head_exact": t.head_exact,
            "head_max_error": float(t.head_err),
            "storage_error": _gather_storage_error(out, p.n_shards),
            "teacher_tokenizer_fingerprint": inputs["teacher_tokenizer"],
            "head_sha256": sha256_file(out / HEAD_FILE),
            "embeddings_sha256": sha256_file(out / EMBEDDINGS_FILE) if cfg.cache.store_embeddings else None,
            "world_size": dist.world_size,
            "origins": dict(Counter(e.origin for e in p.examples)),
        },
        p.n_shards,
    )
    size = sum(s.bytes for s in manifest.shards)
    print(
        f"teacher-cache: {manifest.rows} rows, {manifest.response_tokens} response tokens, {len(manifest.shards)} "
        f"shard(s), {size / max(manifest.response_tokens, 1):.0f} bytes/response token -> {out}"
    )
    _record(cfg, p.writer, manifest, _student_view(p, repair=False))


def _student_view(p: Plan, repair: bool) -> Path | None:
    """Rank 0, the teacher cache finished: the student view for a student tokenizer other than the teacher's
    (built if missing, its shards re-checked by sha256 with `repair`), or None."""
    if p.same:
        return None
    return views.build(p.out, p.student_tok, repair=repair)


# --------------------------------------------------------------------------------------------------------------
# Up to date, resume, or repair


def _once_files(manifest) -> dict[str, str | None]:
    """The files a finished cache holds besides its shards -> their sha256 where the manifest records one."""
    need = {HEAD_FILE: manifest.head_sha256, DATA_FILE: None, "config.yaml": None,
            f"{TEACHER_TOKENIZER}/tokenizer.json": None}
    if manifest.embeddings_sha256:
        need[EMBEDDINGS_FILE] = manifest.embeddings_sha256
    if manifest.hidden_encoding == "int8":
        need[CHANNEL_SCALE_FILE] = None
    return need


def _record(cfg: TeacherCacheConfig, writer: CacheWriter, manifest, view: Path | None) -> None:
    """The quick up-to-date check's record (pipeline/stamps.py): the once-per-cache files, and the student view's
    manifest when the cache was asked for another student tokenizer."""
    files = sorted(_once_files(manifest)) + ([str(view.relative_to(writer.dir) / MANIFEST)] if view else [])
    stamps.record(writer.root, stamps.teacher_cache_key(cfg),
                  {"dir": writer.dir.name, "fingerprint": manifest.fingerprint, "files": files})


def repair(path: str | Path) -> Path:
    """`dskd cache verify --repair`: re-run stage 1 for the cache at `path` (a cache directory or a cache root)
    from its own config.yaml and its own copy of the data, recomputing only what is missing or bad."""
    d = Path(path)
    if not (d / "config.yaml").is_file() and (d / CURRENT).is_file():
        d = d / (d / CURRENT).read_text().strip()
    if not (d / "config.yaml").is_file():
        raise CacheError(f"{d}: no config.yaml, so the teacher that built it is unknown; re-run `dskd teacher-cache` "
                         "with the config it was built from (it adopts the shards that are still good)")
    cfg = load_config(TeacherCacheConfig, d / "config.yaml")
    cfg = dataclasses.replace(cfg, out_dir=str(d.parent))
    if (d / DATA_FILE).is_file():  # exactly the rows it was built from, wherever the original data is now
        cfg = dataclasses.replace(cfg, data=DataConfig(path=str(d / DATA_FILE), id_field="id"))
    out = run(cfg, repair=True, expect_dir=d)
    views.repair_views(out)  # every other student view beside it, from the tokenizer saved in each
    return out


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _check_generated(examples: list[Example], student_fp: str, cfg: TeacherCacheConfig) -> None:
    """Generated rows are scored as the exact ids they were sampled as: those must be the student tokenizer's."""
    for e in examples:
        if e.generated and e.tokenizer != student_fp:
            side = "student_tokenizer" if cfg.student_tokenizer else "teacher's tokenizer (no student_tokenizer is set)"
            raise TokenizerError(f"{cfg.data.path}: row {e.id!r}: its token ids belong to tokenizer {e.tokenizer[:12]}, "
                                 f"but this cache's student side is the {side} ({student_fp[:12]}); set "
                                 "student_tokenizer to the tokenizer of the model that generated the rows")


def _save_embeddings(model, path: Path) -> None:
    atomic_save_safetensors(path, {"weight": model.get_input_embeddings().weight.detach().cpu()})


def _storage_error(head: OutputHead, results: list, encoding: str, channel_scale: np.ndarray | None,
                   sample: int) -> dict:
    """How far logits recomputed from the stored hidden states (encoded, then decoded) are from the cached ones:
    the max |error| of the top-k at every position (k * d per position through `OutputHead.logits_at`), and on up
    to `sample` positions (`kl_sample_size`) the log-sum-exp error and KL(exact || recomputed), against the exact
    logits the forward kept (`teacher_forward`'s keep_logits) where it kept them."""
    hidden = torch.cat([r.hidden for r in results])
    ids, top, lse = (torch.cat([getattr(r, f) for r in results]) for f in ("topk_ids", "topk_logits", "lse"))
    out = StorageError()
    if hidden.numel():
        out.max_abs_logit = max(float(top.abs().max()), float(lse.abs().max()))
    if not hidden.numel() or encoding == str(hidden.dtype).removeprefix("torch."):  # lossless
        return out.to_dict()
    device = head.weight.device
    values, scale = encode_hidden(hidden.cpu(), encoding, channel_scale)
    approx = decode_hidden(values, scale, encoding, channel_scale).to(device)
    for part in range(0, len(approx), 256):
        z = head.logits_at(approx[part : part + 256], ids[part : part + 256].to(device))
        out.topk_max = max(out.topk_max, float((z.cpu() - top[part : part + 256]).abs().max()))
    if sample:  # a chunk of positions at a time: (positions x V) float32 logits, several alive in the KL
        chunk = stage1_chunk_positions(head.vocab_size)
        n = min(sample, len(approx))
        exact = [r.logits for r in results if r.logits is not None]  # kept by the forward: not computed again
        exact = torch.cat(exact) if exact else None
        for part in range(0, n, chunk):
            rows = slice(part, min(part + chunk, n))
            z_approx = head.logits(approx[rows])
            kept = exact is not None and len(exact) >= rows.stop
            z = exact[rows].to(device) if kept else head.logits(hidden[rows].to(device))
            kl = divergence("fkl", z_approx, z, reduction="none").clamp(min=0)  # KL(exact || approx)
            out.lse_max = max(out.lse_max, float((torch.logsumexp(z_approx, -1).cpu() - lse[rows]).abs().max()))
            out.kl_sum, out.kl_max = out.kl_sum + float(kl.sum()), max(out.kl_max, float(kl.max()))
        out.kl_positions = n
    return out.to_dict()


def _gather_storage_error(cache_dir: Path, n_shards: int) -> dict:
    total = StorageError()
    for i in range(n_shards):
        meta = shard_metadata(cache_dir / SHARD_PATTERN.format(i)) or {}
        total.merge(json.loads(meta[STORAGE_META]))
    return total.summary()


def _write_shard(writer: CacheWriter, schema: pa.Schema, prep: PreparedShard, outputs: list, encoding: str,
                 channel_scale: np.ndarray | None, err: StorageError) -> None:
    """Encode one shard's rows (data order) into Arrow columns and write it (runs in the writer thread)."""
    # numpy only in this thread (schema.encode_hidden: torch here would start a second OpenMP team)
    values, scale = encode_hidden(float32_rows([o.hidden for o in outputs]), encoding, channel_scale)
    if not stored_finite(values, encoding):
        raise CacheError(f"shard {prep.index}: a hidden state overflows {encoding}; use cache.hidden_dtype float32")
    split = np.cumsum([o.hidden.shape[0] for o in outputs])[:-1]
    cols = {
        "id": pa.array([e.id for e in prep.rows], pa.string()),
        "teacher_ids": list_column([np.asarray(t.ids, np.int32) for t in prep.teacher], schema.field("teacher_ids").type),
        "teacher_response_start": pa.array([t.response_start for t in prep.teacher], pa.int32()),
        "hidden": list_column(np.split(values, split), schema.field("hidden").type),
        "topk_ids": list_column([o.topk_ids.numpy() for o in outputs], schema.field("topk_ids").type),
        "topk_logits": list_column([o.topk_logits.numpy() for o in outputs], schema.field("topk_logits").type),
        "lse": list_column([o.lse.numpy() for o in outputs], schema.field("lse").type),
        "target_logprob": list_column([o.target_logprob.numpy() for o in outputs], schema.field("target_logprob").type),
    }
    if scale is not None:
        cols["hidden_scale"] = list_column(np.split(scale, split), schema.field("hidden_scale").type)
    meta = {STORAGE_META: json.dumps(err.to_dict())}
    table = pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema.with_metadata(meta))
    writer.write_shard(prep.index, table)
