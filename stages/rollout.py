"""Stage `rollout`: a model answers a prompt set; the answers are written as a rollout directory.

The model is a hub name, a local directory, a GGUF file, a trained student (`<run>/final`) or a LoRA adapter (served
merged). Layout, one directory per fingerprint (model weights + tokenizer + prompts + settings + backend):

    <out_dir>/<model name>-<fingerprint[:12]>/
        shard-00000.jsonl ...   rows in prompt order (each prompt's samples together), written to a temporary name
                                and renamed: id, prompt_id, prompt, response (text), prompt_ids, response_ids (exactly
                                as sampled; the EOS included when it was sampled), tokenizer (its fingerprint),
                                origin, model, seed, sample, finish_reason (and logprobs when asked)
        tokenizer/              the tokenizer the ids belong to
        config.yaml             the resolved config
        manifest.json           written last: the fingerprint and its inputs, the shards (rows, bytes, sha256), counts
    <out_dir>/CURRENT           the newest directory's name (a data source may name <out_dir> itself)

A finished directory with the same fingerprint is left alone; a killed run resumes (finished shards are kept, and
their rows are the ones an uninterrupted run writes: shard i is generated with the seed derived from (seed, i)); a
changed setting gets a new directory. The directory is a data source for stage 1 (on-policy: the teacher scores
the student's own tokens) and for SFT (SeqKD: a student learns the teacher's answers).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path

from pipeline import lock
from pipeline.config import RolloutConfig, config_identity, dump_config
from pipeline.data.records import ROLLOUT_MANIFEST, DataError, Example, jsonl_records, load_examples
from pipeline.data.tokenize import Truncation, encode_prompt, special_ids
from pipeline.generate import open_generator, request_seed, resolve_backend
from pipeline.io_utils import atomic_write_text, hash_json, sha256_file, write_json, write_text_if_changed
from pipeline.models.load import (
    check_model_ref,
    load_tokenizer,
    model_fingerprint,
    short_name,
    tokenizer_fingerprint,
)

SHARD = "shard-{:05d}.jsonl"


def select_prompts(examples: list[Example], cfg: RolloutConfig) -> list[Example]:
    """All prompts, or a seeded random subset of `cfg.prompts` of them (kept in data order)."""
    if cfg.prompts is None or cfg.prompts >= len(examples):
        return examples
    chosen = sorted(random.Random(cfg.subset_seed).sample(range(len(examples)), cfg.prompts))
    return [examples[i] for i in chosen]


def _shard_ok(path: Path, rows: int) -> bool:
    """A shard file on disk is complete: it parses and holds the rows it must (it was renamed into place whole, but
    a disk can still lose it)."""
    try:
        lines = [rec for rec, _, _ in jsonl_records(path)]  # split at "\n" only (not str.splitlines: U+2028 ...)
    except (OSError, DataError):
        return False
    return len(lines) == rows


def finished(out: Path, fingerprint: str) -> bool:
    try:
        manifest = json.loads((out / ROLLOUT_MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("fingerprint") == fingerprint and all(
        (out / s["file"]).is_file() and (out / s["file"]).stat().st_size == s["bytes"] for s in manifest["shards"])


def run(cfg: RolloutConfig) -> Path:
    with contextlib.ExitStack() as held:  # the rollout directory's lock, from the first decision about it to the end
        return _run(cfg, held)


def _run(cfg: RolloutConfig, held: contextlib.ExitStack) -> Path:
    # cheap checks first: the prompts, the model's files, the backend, the tokenizer
    examples = select_prompts(load_examples(cfg.data), cfg)
    check_model_ref(cfg.model)
    backend = resolve_backend(cfg.sampling.backend)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    special_ids(tokenizer)  # generation stops at EOS: a tokenizer without one is refused here
    cut = Truncation()
    prompts = [encode_prompt(tokenizer, e.prompt, cfg.tokenize, cut, e.id) for e in examples]
    if msg := cut.message(cfg.tokenize, "rollout"):
        print(msg)
    name = cfg.model_name or short_name(cfg.model)
    tok_fp = tokenizer_fingerprint(tokenizer)
    # what changes the rows: hf's batches share one random stream (and their padding), so their size counts there
    ignore = ("gpu_memory_utilization", "backend") + (("batch_size",) if backend == "vllm" else ())
    settings = {k: v for k, v in config_identity(cfg.sampling).items() if k not in ignore}
    inputs = {"model": model_fingerprint(cfg.model), "tokenizer": tok_fp,
              "prompts": hash_json([[e.id, p] for e, p in zip(examples, prompts)]), "sampling": settings,
              "backend": backend, "seed": cfg.seed, "samples_per_prompt": cfg.samples_per_prompt,
              "logprobs": cfg.logprobs, "rows_per_shard": cfg.rows_per_shard, "origin": [name, cfg.round]}
    fingerprint = hash_json(inputs)
    root = Path(cfg.out_dir)
    out = root / f"{name}-{fingerprint[:12]}"
    held.enter_context(lock.writer(out, "rollout"))  # one writer, before anything in it is read or written
    if finished(out, fingerprint):
        write_text_if_changed(root / "CURRENT", out.name + "\n")
        print(f"rollout: up to date ({out})")
        return out
    if out.exists() and (out / ROLLOUT_MANIFEST).exists():  # another fingerprint under our name, or a lost shard
        (out / ROLLOUT_MANIFEST).unlink()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        tmp = out / f".tokenizer.tmp-{os.getpid()}"
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        os.replace(tmp, out / "tokenizer")

    R = cfg.rows_per_shard
    n_shards = (len(examples) + R - 1) // R
    todo = [i for i in range(n_shards) if not _shard_ok(out / SHARD.format(i), len(examples[i * R : (i + 1) * R]) *
                                                       cfg.samples_per_prompt)]
    if len(todo) < n_shards:
        print(f"rollout: resuming, {n_shards - len(todo)} of {n_shards} shard(s) already written")
    origin = f"rollout:{name}:round{cfg.round}"
    t0 = time.perf_counter()
    generated = _generate(cfg, examples, prompts, tokenizer, out, todo, origin, hash_json(inputs["model"])[:16], tok_fp,
                          n_shards) if todo else 0
    _finish(cfg, out, fingerprint, inputs, name, origin, backend, len(examples), n_shards, generated,
            time.perf_counter() - t0)
    return out


def _generate(cfg: RolloutConfig, examples, prompts, tokenizer, out: Path, todo: list[int], origin: str, model_id: str,
              tok_fp: str, n_shards: int) -> int:
    """The shards `todo`, each written whole (tmp + rename); returns the tokens generated."""
    R, generated = cfg.rows_per_shard, 0
    max_len = cfg.tokenize.max_prompt_length + cfg.sampling.max_new_tokens
    with open_generator(cfg.model, tokenizer, cfg.sampling, max_model_len=max_len, seed=cfg.seed) as gen:
        for i in todo:
            rows = examples[i * R : (i + 1) * R]
            seed = request_seed(cfg.seed, f"shard-{i}")
            comps = gen.generate(prompts[i * R : i * R + len(rows)], cfg.sampling, seed, n=cfg.samples_per_prompt,
                                 logprobs=cfg.logprobs, keys=[e.id for e in rows], progress=True)
            records = []
            for e, p, samples in zip(rows, prompts[i * R :], comps):
                for s, c in enumerate(samples):
                    rec = {"id": e.id if cfg.samples_per_prompt == 1 else f"{e.id}#{s}", "prompt_id": e.id,
                           "prompt": e.prompt, "response": c.text, "prompt_ids": p, "response_ids": c.token_ids,
                           "tokenizer": tok_fp, "origin": origin, "model": model_id, "seed": seed, "sample": s,
                           "finish_reason": c.finish_reason}
                    if c.logprobs is not None:
                        rec["logprobs"] = [round(x, 6) for x in c.logprobs]
                    records.append(json.dumps(rec, ensure_ascii=False))
                    generated += len(c.token_ids)
            atomic_write_text(out / SHARD.format(i), "".join(r + "\n" for r in records))
            print(f"rollout: shard {i + 1}/{n_shards} ({len(records)} rows)")
    return generated


def _finish(cfg: RolloutConfig, out: Path, fingerprint: str, inputs: dict, name: str, origin: str, backend: str,
            prompts: int, n_shards: int, generated: int, seconds: float) -> None:
    """The manifest (written last: the directory is finished) and the CURRENT pointer."""
    shards, finish = [], Counter()
    for i in range(n_shards):
        f = out / SHARD.format(i)
        lines = [rec for rec, _, _ in jsonl_records(f)]
        finish.update(r["finish_reason"] for r in lines)
        shards.append({"file": f.name, "rows": len(lines), "bytes": f.stat().st_size, "sha256": sha256_file(f)})
    write_json(out / ROLLOUT_MANIFEST, {
        "kind": "rollout", "fingerprint": fingerprint, "fingerprint_inputs": inputs, "model_name": name,
        "origin": origin, "backend": backend, "rows": sum(s["rows"] for s in shards), "prompts": prompts,
        "finish_reasons": dict(finish), "shards": shards,
        # this run's loop (model start excluded), for people and bench-rollout; a resumed run counts its own part
        "generated_tokens": generated, "seconds": seconds, "tokens_per_s": generated / max(seconds, 1e-9),
    })
    write_text_if_changed(Path(cfg.out_dir) / "CURRENT", out.name + "\n")
    rows = sum(s["rows"] for s in shards)
    print(f"rollout: {rows} rows ({dict(finish)}), {generated} tokens in {seconds:.1f} s on {backend} -> {out}")
