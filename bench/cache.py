"""`make bench-cache`: stage-1 throughput against a bare teacher forward loop over the same batches.

The bare loop is the least work that yields the same teacher outputs: one decoder pass per batch (same rows, same
length-sorted batches, tokenized beforehand and not timed) and the output head at response positions. Stage 1 adds
tokenization and alignment (loader worker), top-k / log-sum-exp, hidden-state encoding, Arrow writes with fsync.
Both run in this process, one after the other, on the same model; the ratio is stage-1 tokens/s / bare tokens/s
(the cache's own loop timing from build_stats.json, so model loading is excluded from both).

    python bench/cache.py [--rows 128] [--teacher smollm2|tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.config import TeacherCacheConfig, load_config  # noqa: E402
from pipeline.data import load_examples  # noqa: E402
from pipeline.head import OutputHead  # noqa: E402
from pipeline.models import load_model, load_tokenizer  # noqa: E402
from pipeline.tokenize import pad, response_positions, special_ids  # noqa: E402
from stages import teacher_cache  # noqa: E402

SHARED = Path(os.environ.get("DSKD_SHARED", ROOT.parent / "shared")).resolve()


def bare_loop(cfg: TeacherCacheConfig, full_logits: bool) -> tuple[int, float]:
    """Tokens and seconds of the bare forward loop over stage 1's own batches."""
    model = load_model(cfg.teacher)
    head = OutputHead.from_model(model)
    tok = load_tokenizer(cfg.teacher_tokenizer or cfg.teacher)
    _, pad_id = special_ids(tok, require_eos=False)
    examples = load_examples(cfg.data)
    R = cfg.cache.rows_per_shard
    batches = []
    for i in range(0, len(examples), R):
        prep = teacher_cache.prepare_shard(i // R, examples[i : i + R], tok, None, cfg.tokenize, cfg.cache.batch_size)
        batches += [[prep.teacher[j] for j in idx] for idx in prep.batches]
    tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for encs in batches:
            ids, mask = pad([e.ids[:-1] for e in encs], pad_id)
            if full_logits:
                model(input_ids=ids, attention_mask=mask)
            else:
                h = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                head.logits(torch.cat([h[b, response_positions(len(e.ids), e.response_start)] for b, e in enumerate(encs)]))
            tokens += sum(len(e.ids) - 1 for e in encs)
    return tokens, time.perf_counter() - t0


def stage1(cfg: TeacherCacheConfig) -> dict:
    out = teacher_cache.run(cfg)
    stats = json.loads((out / teacher_cache.STATS_FILE).read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    stats["bytes_per_response_token"] = sum(s["bytes"] for s in manifest["shards"]) / manifest["response_tokens"]
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--teacher", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    if args.teacher == "smollm2":
        base = [f"data.path={SHARED}/data/minillm_eval/dolly/valid.jsonl", "data.response_field=output",
                f"data.limit={args.rows}", "tokenize.max_prompt_length=256", "tokenize.max_length=512"]
        config = ROOT / "configs/smollm2/teacher_cache.yaml"
        xtok = [f"student_tokenizer.path={SHARED}/tokenizers", "student_tokenizer.gguf_file=ggml-vocab-gpt-2.gguf"]
    else:
        base = [f"data.limit={args.rows}"]
        config = ROOT / "configs/tiny/teacher_cache.yaml"
        xtok = [f"student_tokenizer.path={ROOT}/runs/tiny/assets/tokenizer-metaspace"]
    common = [*base, f"cache.batch_size={args.batch_size}", f"cache.rows_per_shard={max(args.rows // 4, 1)}"]
    variants = {
        "exact": [],
        "compact": ["cache.mode=compact"],
        "exact, cross-tokenizer (student gpt-2)" if args.teacher == "smollm2" else "exact, cross-tokenizer": xtok,
    }
    cfg = load_config(TeacherCacheConfig, config, [*common, f"out_dir={tmp}/warm"])
    bare_loop(cfg, full_logits=False)  # warm-up: allocator, thread pools, page cache
    tok_f, sec_f = bare_loop(cfg, full_logits=True)
    lines = []
    # each variant is measured right after its own bare loop: machine drift between distant runs is not in the ratio
    for i, (name, extra) in enumerate(variants.items()):
        tok_b, sec_b = bare_loop(cfg, full_logits=False)
        s = stage1(load_config(TeacherCacheConfig, config, [*common, f"out_dir={tmp}/v{i}", *extra]))
        bare = tok_b / sec_b
        lines.append(f"  stage 1, {name:<40} {s['tokens_per_s']:6.0f} tok/s vs bare {bare:6.0f} tok/s: ratio "
                     f"{s['tokens_per_s'] / bare:.3f}  ({s['bytes_per_response_token']:.0f} bytes/response token)")
    print(f"\nbench-cache: teacher {args.teacher}, {args.rows} rows, {tok_f} tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"  bare loop = decoder + head at response positions; naive loop (model(...), logits everywhere): "
          f"{tok_f / sec_f:.0f} tok/s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
