"""Stage 1, `teacher-cache`: run the teacher once over the data and write the sharded Arrow cache.

data -> [loader worker: tokenize both sides, align, sort by length] -> batched teacher forward -> [writer thread:
encode hidden states, Arrow shard (tmp + rename)] -> manifest. The worker prepares shard i+1 and the writer writes
shard i-1 while the teacher runs on shard i. Ranks of a `torchrun` launch take shards i = rank (mod world); rank 0
writes the once-per-cache files and the manifest. A finished cache with the same fingerprint is left alone; an
unfinished one is resumed (shards already on disk are skipped); another fingerprint gets its own directory.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.alignment import aligned_labels, encode_pair, tokenizer_vocab_map
from pipeline.cache_io import CacheError, CacheWriter, cache_dir_name
from pipeline.cache_schema import (
    CHANNEL_SCALE_FILE,
    DATA_FILE,
    EMBEDDINGS_FILE,
    SCHEMA_VERSION,
    VOCAB_MAP_FILE,
    arrow_schema,
    decode_hidden,
    encode_hidden,
    fit_channel_scale,
    list_column,
)
from pipeline.config import TeacherCacheConfig, TokenizeConfig, config_to_dict, dump_config
from pipeline.data import Example, load_examples, write_jsonl
from pipeline.distributed import barrier, local_or_distributed
from pipeline.head import HEAD_FILE, HEAD_TOLERANCE, OutputHead
from pipeline.io_utils import atomic_save_npy, atomic_save_safetensors, hash_json, sha256_file, write_json
from pipeline.losses import divergence
from pipeline.models import (
    checkpoint_dtype,
    keep_freed_memory,
    load_model,
    load_tokenizer,
    model_fingerprint,
    short_name,
    tokenizer_fingerprint,
)
from pipeline.teacher import check_head, teacher_forward
from pipeline.tokenize import Encoded, TokenizerError, encode, special_ids

# this run's throughput (rank 0's tokens and seconds); informational, not part of the cache's identity
STATS_FILE = "build_stats.json"
# positions per shard (from its first batch) on which compact mode measures its KL against the exact hidden states
KL_SAMPLE = 128
# rows of the data the head check runs on
HEAD_CHECK_ROWS = 8


# --------------------------------------------------------------------------------------------------------------
# Preparation (runs in the data-loader worker)


@dataclass
class PreparedShard:
    index: int
    rows: list[Example]
    teacher: list[Encoded]
    student: list[Encoded]
    alignments: list[np.ndarray] | None  # per row (K, 2) label positions, cross-tokenizer only
    batches: list[list[int]]  # row indices per teacher forward, sorted by teacher length
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
            return PreparedShard(index, rows, [], [], None, [], error=f"{self.where}: {e}")


def prepare_shard(
    index: int, rows: list[Example], teacher_tok, student_tok, tok_cfg: TokenizeConfig, batch_size: int
) -> PreparedShard:
    aligned = student_tok is not None
    t_enc, s_enc, alignments = [], [], [] if aligned else None
    for e in rows:
        t, s, pairs = encode_pair(e, teacher_tok, student_tok, tok_cfg)
        t_enc.append(t)
        s_enc.append(s)
        if aligned:
            alignments.append(pairs)
    # batches of similar length waste little compute on padding; rows are written back in data order
    order = sorted(range(len(rows)), key=lambda i: len(t_enc[i].ids))
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    return PreparedShard(index, rows, t_enc, s_enc, alignments, batches)


def _identity(x):
    return x


# --------------------------------------------------------------------------------------------------------------
# Stage


def run(cfg: TeacherCacheConfig) -> Path:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader worker is a forked process
    dist = local_or_distributed()
    if dist.device.type == "cpu":
        keep_freed_memory()
    teacher_tok = load_tokenizer(cfg.teacher_tokenizer or cfg.teacher)
    student_tok = load_tokenizer(cfg.student_tokenizer) if cfg.student_tokenizer else teacher_tok
    s_fp, t_fp = tokenizer_fingerprint(student_tok), tokenizer_fingerprint(teacher_tok)
    same = s_fp == t_fp
    _, t_pad = special_ids(teacher_tok, require_eos=False)
    special_ids(student_tok)  # a student tokenizer without EOS is an error here, before any work
    examples = load_examples(cfg.data)
    encoding = "int8" if cfg.cache.mode == "compact" else (
        cfg.teacher.dtype if cfg.cache.hidden_dtype == "auto" else cfg.cache.hidden_dtype
    )
    fingerprint_inputs = {
        "schema_version": SCHEMA_VERSION,
        "teacher": model_fingerprint(cfg.teacher),
        "teacher_tokenizer": t_fp,
        "student_tokenizer": s_fp,
        "data": hash_json([[e.id, e.prompt, e.response] for e in examples]),
        "tokenize": config_to_dict(cfg.tokenize),
        "top_k": cfg.cache.top_k,
        "hidden_encoding": encoding,
        "store_embeddings": cfg.cache.store_embeddings,
        "rows_per_shard": cfg.cache.rows_per_shard,
    }
    fingerprint = hash_json(fingerprint_inputs)
    teacher_name = cfg.teacher_name or short_name(cfg.teacher)
    writer = CacheWriter(Path(cfg.out_dir), cache_dir_name(teacher_name, fingerprint), fingerprint)
    out = writer.dir
    if writer.status() == "done":
        if dist.is_main:
            writer.mark_current()
            print(f"teacher-cache: up to date ({out})")
        return out

    model = load_model(cfg.teacher).to(dist.device)
    head = OutputHead.from_model(model)
    k = min(cfg.cache.top_k, head.vocab_size)
    check_rows = [encode(teacher_tok, e.prompt, e.response, cfg.tokenize, require_eos=False).ids
                  for e in examples[:HEAD_CHECK_ROWS]]
    head_err = check_head(model, head, check_rows, t_pad)
    # above the tolerance the cache falls back to top-k + tail
    head_exact = head_err <= HEAD_TOLERANCE[checkpoint_dtype(model)]
    if not head_exact and dist.is_main:
        print(
            f"teacher-cache: WARNING: the output head does not reproduce {cfg.teacher.path!r}'s logits (max error "
            f"{head_err:.3g}); falling back to top-k + tail from the model's own logits (stage 2 cannot recompute them)"
        )
    vmap = None if same else tokenizer_vocab_map(teacher_tok, student_tok)
    if dist.is_main:
        writer.begin()
        head.save(out / HEAD_FILE)
        if cfg.cache.store_embeddings:
            _save_embeddings(model, out / EMBEDDINGS_FILE)
        if vmap is not None:
            atomic_save_npy(out / VOCAB_MAP_FILE, vmap)
        teacher_tok.save_pretrained(out / "teacher_tokenizer")
        student_tok.save_pretrained(out / "student_tokenizer")
        write_jsonl(out / DATA_FILE, [{"id": e.id, "prompt": e.prompt, "response": e.response} for e in examples])
        dump_config(cfg, out / "config.yaml")
        if encoding == "int8" and not (out / CHANNEL_SCALE_FILE).exists():  # fitted once: a resume reuses it
            sample = teacher_forward(model, head, check_rows, [1] * len(check_rows), 1, t_pad)  # every position
            atomic_save_npy(out / CHANNEL_SCALE_FILE, fit_channel_scale(torch.cat([r.hidden for r in sample])))
    barrier()
    channel_scale = np.load(out / CHANNEL_SCALE_FILE) if encoding == "int8" else None

    R = cfg.cache.rows_per_shard
    n_shards = (len(examples) + R - 1) // R
    done = writer.complete_shards()
    todo = [i for i in range(n_shards) if i % dist.world_size == dist.rank and i not in done]
    if done and dist.is_main:
        print(f"teacher-cache: resuming, {len(done)} of {n_shards} shard(s) already complete")
    schema = arrow_schema(head.hidden_size, k, encoding, aligned=not same)
    preparer = ShardPreparer(examples, todo, R, cfg.cache.batch_size, teacher_tok, None if same else student_tok,
                             cfg.tokenize, str(cfg.data.path))
    workers = cfg.cache.loader_workers
    loader = DataLoader(preparer, batch_size=None, collate_fn=_identity, num_workers=workers,
                        prefetch_factor=2 if workers else None)
    bar = tqdm(total=sum(len(examples[i * R : (i + 1) * R]) for i in todo), unit="row",
               desc=f"teacher-cache[{dist.rank}]" if dist.world_size > 1 else "teacher-cache", mininterval=2.0,
               disable=not dist.is_main)
    tokens, t0 = 0, time.perf_counter()
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        for prep in loader:
            if prep.error:
                raise TokenizerError(prep.error)
            outputs: list = [None] * len(prep.rows)
            kl = None
            for b, idx in enumerate(prep.batches):
                seqs = [prep.teacher[i].ids for i in idx]
                starts = [prep.teacher[i].response_start for i in idx]
                results = teacher_forward(model, head, seqs, starts, k, t_pad, head_exact=head_exact)
                if b == 0 and encoding == "int8":  # a bounded sample: two extra head passes cost a few percent
                    kl = _compact_kl(head, torch.cat([r.hidden for r in results])[:KL_SAMPLE], channel_scale)
                for i, r in zip(idx, results):
                    outputs[i] = r
                tokens += sum(len(s) - 1 for s in seqs)
                bar.update(len(idx))
                bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}", refresh=False)
            if pending is not None:
                pending.result()  # at most one shard in flight: bounded memory, errors surface promptly
            pending = pool.submit(
                _write_shard, writer, schema, prep, outputs, encoding, channel_scale, vmap, kl
            )
        if pending is not None:
            pending.result()
    elapsed = time.perf_counter() - t0
    bar.close()
    if dist.is_main:  # throughput of this run's loop (first preparation and last write included), for people and bench
        write_json(out / STATS_FILE, {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9),
                                      "world_size": dist.world_size, "shards": len(todo)})
    barrier()
    if not dist.is_main:
        return out

    manifest = writer.finish(
        {
            "fingerprint_inputs": fingerprint_inputs,
            "teacher_name": teacher_name,
            "teacher_vocab_size": head.vocab_size,
            "hidden_size": head.hidden_size,
            "mode": cfg.cache.mode,
            "hidden_encoding": encoding,
            "top_k": k,
            "head_exact": head_exact,
            "head_max_error": float(head_err),
            "compact_kl": _gather_kl(writer.dir) if encoding == "int8" else None,
            "same_tokenizer": same,
            "student_tokenizer_fingerprint": s_fp,
            "teacher_tokenizer_fingerprint": t_fp,
            "head_sha256": sha256_file(out / HEAD_FILE),
            "embeddings_sha256": sha256_file(out / EMBEDDINGS_FILE) if cfg.cache.store_embeddings else None,
            "world_size": dist.world_size,
        },
        n_shards,
    )
    size = sum(s.bytes for s in manifest.shards)
    print(
        f"teacher-cache: {manifest.rows} rows, {manifest.response_tokens} response tokens, {len(manifest.shards)} "
        f"shard(s), {size / max(manifest.response_tokens, 1):.0f} bytes/response token -> {out}"
    )
    return out


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _save_embeddings(model, path: Path) -> None:
    atomic_save_safetensors(path, {"weight": model.get_input_embeddings().weight.detach().cpu()})


def _compact_kl(head: OutputHead, hidden: torch.Tensor, channel_scale: np.ndarray) -> tuple[float, float, int, float]:
    """(sum, max, count) over positions of KL(exact teacher distribution || recomputed from the int8 encoding), and
    the max |logit error| at the exact top-k and of the log-sum-exp (what stage 2's teacher check compares)."""
    values, scale = encode_hidden(hidden.cpu(), "int8", channel_scale)
    approx = decode_hidden(values, scale, "int8", channel_scale).to(hidden.device)
    z, z_approx = head.logits(hidden), head.logits(approx)
    kl = divergence("fkl", z_approx, z, reduction="none")  # KL(exact || approx)
    top = z.topk(min(32, z.shape[-1]), dim=-1).indices
    err = max(
        (z.gather(-1, top) - z_approx.gather(-1, top)).abs().max().item(),
        (torch.logsumexp(z, -1) - torch.logsumexp(z_approx, -1)).abs().max().item(),
    )
    return float(kl.sum()), float(kl.max()), int(kl.numel()), float(err)


def _gather_kl(cache_dir: Path) -> dict:
    total, worst, n, err = 0.0, 0.0, 0, 0.0
    for path in sorted(cache_dir.glob("shard-*.arrow")):
        meta = pa.ipc.open_file(pa.memory_map(str(path), "r")).schema.metadata or {}
        total += float(meta[b"compact_kl_sum"])
        worst = max(worst, float(meta[b"compact_kl_max"]))
        n += int(meta[b"compact_kl_positions"])
        err = max(err, float(meta[b"compact_logit_error"]))
    return {"mean": total / max(n, 1), "max": worst, "positions": n, "max_logit_error": err}


def _write_shard(writer: CacheWriter, schema: pa.Schema, prep: PreparedShard, outputs: list, encoding: str,
                 channel_scale: np.ndarray | None, vmap: np.ndarray | None, kl: tuple | None) -> None:
    """Encode one shard's rows (data order) into Arrow columns and write it (runs in the writer thread)."""
    hidden = torch.cat([o.hidden for o in outputs])
    values, scale = encode_hidden(hidden, encoding, channel_scale)
    if encoding in ("float16", "bfloat16") and not torch.isfinite(decode_hidden(values, None, encoding)).all():
        raise CacheError(f"shard {prep.index}: a hidden state overflows {encoding}; use cache.hidden_dtype float32")
    split = np.cumsum([o.hidden.shape[0] for o in outputs])[:-1]
    cols = {
        "id": pa.array([e.id for e in prep.rows], pa.string()),
        "student_ids": list_column([np.asarray(s.ids, np.int32) for s in prep.student], schema.field("student_ids").type),
        "student_response_start": pa.array([s.response_start for s in prep.student], pa.int32()),
        "teacher_ids": list_column([np.asarray(t.ids, np.int32) for t in prep.teacher], schema.field("teacher_ids").type),
        "teacher_response_start": pa.array([t.response_start for t in prep.teacher], pa.int32()),
        "hidden": list_column(np.split(values, split), schema.field("hidden").type),
        "topk_ids": list_column([o.topk_ids.numpy() for o in outputs], schema.field("topk_ids").type),
        "topk_logits": list_column([o.topk_logits.numpy() for o in outputs], schema.field("topk_logits").type),
        "lse": list_column([o.lse.numpy() for o in outputs], schema.field("lse").type),
    }
    if scale is not None:
        cols["hidden_scale"] = list_column(np.split(scale, split), schema.field("hidden_scale").type)
    if prep.alignments is not None:
        labels, ratios = [], []
        for s, t, o, pos in zip(prep.student, prep.teacher, outputs, prep.alignments):
            labels.append(aligned_labels(o.topk_ids[:, 0].numpy(), pos, t.response_start, vmap))
            ratios.append(len(pos) / s.n_response)
        cols["align_student"] = list_column([p[:, 0] for p in prep.alignments], schema.field("align_student").type)
        cols["align_teacher"] = list_column([p[:, 1] for p in prep.alignments], schema.field("align_teacher").type)
        cols["align_label"] = list_column(labels, schema.field("align_label").type)
        cols["align_ratio"] = pa.array(ratios, pa.float32())
    meta = None
    if kl is not None:
        meta = {
            "compact_kl_sum": repr(kl[0]),
            "compact_kl_max": repr(kl[1]),
            "compact_kl_positions": str(kl[2]),
            "compact_logit_error": repr(kl[3]),
        }
    table = pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema.with_metadata(meta))
    writer.write_shard(prep.index, table)
