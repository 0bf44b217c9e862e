"""`make bench-cache`: stage-1 throughput against a bare teacher forward loop over the same batches.

The bare loop is the least work that yields the same teacher outputs: one decoder pass per batch (same rows, same
length-sorted batches, tokenized beforehand and not timed) and the output head at response positions. Stage 1 adds
tokenization and alignment (loader worker), top-k / log-sum-exp, hidden-state encoding, Arrow writes with fsync.
Both run in this process, one after the other, on the same model; the ratio is stage-1 tokens/s / bare tokens/s
(the cache's own loop timing from build_stats.json, so model loading is excluded from both), taken in each of
`--rounds` interleaved rounds and shown as its median and min-max (bench/common.py).

Per variant it also reports the cache's bytes per response token by column and the reconstruction KL: the mean
KL(teacher || teacher recomputed from the stored hidden states) over sampled positions, from the storage check
stage 1 runs (0 when the storage dtype is the teacher's own), and `cache verify`'s KL of the stored top-k + tail
against the recomputed distribution.

    python bench/cache.py [--rows 128] [--teacher smollm2|tiny] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, SHARED, show, spread  # noqa: E402,F401  (the project on sys.path, hub off)

from pipeline.config import TeacherCacheConfig, load_config  # noqa: E402
from pipeline.data.records import load_examples  # noqa: E402
from pipeline.data.tokenize import pad, response_positions, special_ids  # noqa: E402
from pipeline.models.head import OutputHead  # noqa: E402
from pipeline.models.load import load_model, load_tokenizer  # noqa: E402
from stages import teacher_cache  # noqa: E402


def bare_loop(cfg: TeacherCacheConfig, full_logits: bool) -> tuple[int, float]:
    """Tokens and seconds of the bare forward loop over stage 1's own batches."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where stage 1 runs its teacher
    model = load_model(cfg.teacher).to(dev)
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
            ids, mask = ids.to(dev), mask.to(dev)
            if full_logits:
                model(input_ids=ids, attention_mask=mask)
            else:
                h = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
                head.logits(torch.cat([h[b, response_positions(len(e.ids), e.response_start)] for b, e in enumerate(encs)]))
            tokens += sum(len(e.ids) - 1 for e in encs)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - t0


def stage1(cfg: TeacherCacheConfig) -> dict:
    from pipeline.cache.verify import info, verify

    out = teacher_cache.run(cfg)
    stats = json.loads((out / teacher_cache.STATS_FILE).read_text())
    facts = info(out)
    # a cross-tokenizer student reads the cache through its view: its bytes count per teacher response token too
    view_bytes = sum(v["bytes"] for v in facts["views"])
    stats["bytes_per_response_token"] = facts["bytes_per_response_token"] + view_bytes / max(facts["response_tokens"], 1)
    stats["bytes_by_column"] = {**facts["bytes_per_response_token_by_column"],
                                **({"student view": view_bytes / max(facts["response_tokens"], 1)} if view_bytes else {})}
    stats["hidden_encoding"] = facts["hidden_encoding"]
    stats["storage_kl_mean"] = (facts["storage_error"] or {}).get("kl_mean", 0.0)
    stats["topk_tail_kl_mean"] = verify(out).kl_mean
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--teacher", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every variant (median and min-max)")
    ap.add_argument("--json", default=None, help="also write the results here")
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
        "exact (hidden bf16)" if args.teacher == "smollm2" else "exact": [],
        "compact (hidden int8)": ["cache.mode=compact"],
        "exact, cross-tokenizer (student gpt-2)" if args.teacher == "smollm2" else "exact, cross-tokenizer": xtok,
    }
    cfg = load_config(TeacherCacheConfig, config, [*common, f"out_dir={tmp}/warm"])
    bare_loop(cfg, full_logits=False)  # warm-up: allocator, thread pools, page cache
    tok_f, sec_f = bare_loop(cfg, full_logits=True)
    lines, results = [], []
    runs: dict[str, list[tuple[float, dict]]] = {name: [] for name in variants}
    # each variant is measured right after its own bare loop, and the variants are interleaved for --rounds rounds
    # (median kept): machine drift between distant runs is not in the ratio
    for r in range(args.rounds):
        for i, (name, extra) in enumerate(variants.items()):
            tok_b, sec_b = bare_loop(cfg, full_logits=False)
            s = stage1(load_config(TeacherCacheConfig, config, [*common, f"out_dir={tmp}/r{r}v{i}", *extra]))
            runs[name].append((tok_b / sec_b, s))
    for name, got in runs.items():
        bare = statistics.median(b for b, _ in got)
        tok_s = statistics.median(s["tokens_per_s"] for _, s in got)
        ratio = spread(s["tokens_per_s"] / b for b, s in got)
        s = got[-1][1]
        results.append({"variant": name, "stage1_tok_s": tok_s, "bare_tok_s": bare, "ratio": ratio,
                        "peak_rss_mb": s.get("peak_rss_mb"),
                        "bytes_per_response_token": s["bytes_per_response_token"], "bytes_by_column": s["bytes_by_column"],
                        "hidden_encoding": s["hidden_encoding"], "storage_kl_mean": s["storage_kl_mean"],
                        "topk_tail_kl_mean": s["topk_tail_kl_mean"]})
        lines.append(f"  stage 1, {name:<40} {tok_s:6.0f} tok/s vs bare {bare:6.0f} tok/s: ratio {show(ratio)}  "
                     f"({s['bytes_per_response_token']:.0f} bytes/response token, hidden {s['hidden_encoding']}, "
                     f"reconstruction KL {s['storage_kl_mean']:.2e}, top-k+tail KL {s['topk_tail_kl_mean']:.2e})")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nbench-cache: teacher {args.teacher}, {args.rows} rows, {tok_f} tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"  bare loop = decoder + head at response positions; naive loop (model(...), logits everywhere): "
          f"{tok_f / sec_f:.0f} tok/s")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "teacher": args.teacher, "rows": args.rows, "tokens": tok_f, "batch_size": args.batch_size,
            "threads": torch.get_num_threads(), "rounds": args.rounds, "naive_tok_s": tok_f / sec_f,
            "variants": results}, indent=1))


if __name__ == "__main__":
    main()
