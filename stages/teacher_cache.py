"""Stage 1, `teacher-cache`: run the teacher once over the data and write the sharded Arrow cache.

data -> (student ids, teacher ids) -> batched teacher forward, sorted by length -> shards (tmp + rename) -> manifest.
A finished cache with the same fingerprint is left alone; an unfinished one is resumed after its last complete
shard; a directory holding another fingerprint is refused.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.cache_io import CacheError, CacheWriter
from pipeline.cache_schema import SCHEMA_VERSION, arrow_schema, hidden_to_numpy
from pipeline.config import TeacherCacheConfig, config_to_dict, dump_config
from pipeline.data import load_examples
from pipeline.head import HEAD_FILE, OutputHead
from pipeline.io_utils import hash_json, sha256_file
from pipeline.models import (
    checkpoint_dtype,
    load_model,
    load_tokenizer,
    model_fingerprint,
    short_name,
    tokenizer_fingerprint,
)
from pipeline.teacher import check_head, teacher_forward
from pipeline.tokenize import encode, special_ids

# max |head(hidden) - model logits| accepted on the first batch, by compute dtype
HEAD_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}


def run(cfg: TeacherCacheConfig) -> Path:
    out = Path(cfg.out_dir)
    teacher_tok = load_tokenizer(cfg.teacher_tokenizer or cfg.teacher)
    student_tok = load_tokenizer(cfg.student_tokenizer) if cfg.student_tokenizer else teacher_tok
    _, teacher_pad = special_ids(teacher_tok)
    examples = load_examples(cfg.data)
    hidden_dtype = cfg.teacher.dtype if cfg.cache.hidden_dtype == "auto" else cfg.cache.hidden_dtype

    fingerprint_inputs = {
        "schema_version": SCHEMA_VERSION,
        "teacher": model_fingerprint(cfg.teacher),
        "teacher_tokenizer": tokenizer_fingerprint(teacher_tok),
        "student_tokenizer": tokenizer_fingerprint(student_tok),
        "data": hash_json([[e.id, e.prompt, e.response] for e in examples]),
        "tokenize": config_to_dict(cfg.tokenize),
        "top_k": cfg.cache.top_k,
        "hidden_dtype": hidden_dtype,
        "rows_per_shard": cfg.cache.rows_per_shard,
    }
    fingerprint = hash_json(fingerprint_inputs)
    writer = CacheWriter(out, fingerprint, rows_per_shard=cfg.cache.rows_per_shard)
    if writer.status() == "done":
        print(f"teacher-cache: up to date ({out}, fingerprint {fingerprint[:12]})")
        return out

    model = load_model(cfg.teacher)
    head = OutputHead.from_model(model)
    schema = arrow_schema(head.hidden_size, min(cfg.cache.top_k, head.vocab_size), hidden_dtype)
    first_shard = writer.begin()
    head.save(out / HEAD_FILE)
    teacher_tok.save_pretrained(out / "teacher_tokenizer")
    student_tok.save_pretrained(out / "student_tokenizer")
    dump_config(cfg, out / "config.yaml")

    R = cfg.cache.rows_per_shard
    n_shards = (len(examples) + R - 1) // R
    if first_shard:
        print(f"teacher-cache: resuming after {first_shard} complete shard(s) of {n_shards}")
    bar = tqdm(total=len(examples), initial=min(first_shard * R, len(examples)), unit="row", desc="teacher-cache",
               mininterval=2.0)
    checked = False
    tokens, t0 = 0, time.perf_counter()
    for shard in range(first_shard, n_shards):
        rows = examples[shard * R : (shard + 1) * R]
        t_enc = [encode(teacher_tok, e.prompt, e.response, cfg.tokenize) for e in rows]
        s_enc = t_enc if student_tok is teacher_tok else [encode(student_tok, e.prompt, e.response, cfg.tokenize) for e in rows]
        # batches of similar length waste little compute on padding; rows are written back in data order
        order = sorted(range(len(rows)), key=lambda i: len(t_enc[i].ids))
        outputs: dict[int, object] = {}
        for b in range(0, len(order), cfg.cache.batch_size):
            idx = order[b : b + cfg.cache.batch_size]
            seqs = [t_enc[i].ids for i in idx]
            if not checked:
                err = check_head(model, head, seqs, teacher_pad)
                if not err <= HEAD_TOLERANCE[checkpoint_dtype(model)]:
                    raise CacheError(
                        f"the output head does not reproduce {cfg.teacher.path!r}'s logits (max error {err:.3g}); "
                        "this architecture's head is not supported by hidden-state caching"
                    )
                checked = True
            results = teacher_forward(model, head, seqs, [t_enc[i].response_start for i in idx], cfg.cache.top_k, teacher_pad)
            outputs.update(zip(idx, results))
            tokens += sum(len(s) - 1 for s in seqs)
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}", refresh=False)
        columns: dict[str, list] = {name: [] for name in schema.names}
        for i, e in enumerate(rows):
            o = outputs[i]
            h = hidden_to_numpy(o.hidden, hidden_dtype)
            if hidden_dtype != "float32" and not torch.isfinite(torch.as_tensor(h.astype("float32"))).all():
                raise CacheError(f"row {e.id!r}: hidden state overflows {hidden_dtype}; use hidden_dtype float32")
            columns["id"].append(e.id)
            columns["student_ids"].append(s_enc[i].ids)
            columns["student_response_start"].append(s_enc[i].response_start)
            columns["teacher_ids"].append(t_enc[i].ids)
            columns["teacher_response_start"].append(t_enc[i].response_start)
            columns["hidden"].append(list(h))
            columns["topk_ids"].append(list(o.topk_ids.numpy()))
            columns["topk_logits"].append(list(o.topk_logits.numpy()))
            columns["lse"].append(o.lse.numpy())
        writer.write_shard(shard, columns, schema)
    bar.close()

    manifest = writer.finish(
        {
            "fingerprint_inputs": fingerprint_inputs,
            "teacher_name": cfg.teacher_name or short_name(cfg.teacher),
            "teacher_vocab_size": head.vocab_size,
            "hidden_size": head.hidden_size,
            "hidden_dtype": hidden_dtype,
            "top_k": schema.field("topk_ids").type.value_type.list_size,
            "same_tokenizer": fingerprint_inputs["student_tokenizer"] == fingerprint_inputs["teacher_tokenizer"],
            "student_tokenizer_fingerprint": fingerprint_inputs["student_tokenizer"],
            "teacher_tokenizer_fingerprint": fingerprint_inputs["teacher_tokenizer"],
            "head_sha256": sha256_file(out / HEAD_FILE),
        }
    )
    size = sum(s.bytes for s in manifest.shards)
    print(
        f"teacher-cache: {manifest.rows} rows, {manifest.response_tokens} response tokens, {len(manifest.shards)} "
        f"shard(s), {size / max(manifest.response_tokens, 1):.0f} bytes/response token -> {out}"
    )
    return out
