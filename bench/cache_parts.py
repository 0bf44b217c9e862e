"""Where stage 1's time goes: per component, beside the bare forward loop over the same batches.

    python bench/cache_parts.py [--mode exact|compact|xtok] [--rows 12] [--rounds 2] [--set cache.loader_workers=1]

SmolLM2-135M-Instruct over Dolly as `make bench-cache` runs it (the same batches and shards: rows // 4 per shard).
Each round runs the bare loop, then stage 1 with timers around its functions: the decoder, the head with top-k and
log-sum-exp, the storage-error measurement, the shard writes (the writer thread, overlapped with the next forward), in the timed loop only,
each with the page faults it took (minor faults, MB: fresh or copy-on-write pages). Timers, not a profiler: the
components' sum is the loop's time less the data preparation and waits.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import tempfile
import time

from cache import bare_loop
from common import ROOT, SHARED

import pipeline.cache.teacher as teacher
from pipeline.config import TeacherCacheConfig, load_config
from stages import teacher_cache

MODES = {"exact": [], "compact": ["cache.mode=compact"],
         "xtok": [f"student_tokenizer.path={SHARED}/tokenizers", "student_tokenizer.gguf_file=ggml-vocab-gpt-2.gguf"]}


def faults_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * resource.getpagesize() / 2**20


def timed(times: dict, name: str, fn):
    def wrapper(*a, **k):
        f0, t0 = faults_mb(), time.perf_counter()
        out = fn(*a, **k)
        times[name] += time.perf_counter() - t0
        times[f"{name} faults MB"] += faults_mb() - f0
        return out
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="exact")
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="more stage-1 config overrides")
    args = ap.parse_args()
    times: dict[str, float] = collections.defaultdict(float)
    teacher._hidden = timed(times, "decoder", teacher._hidden)
    teacher._top_k_and_lse = timed(times, "head + top-k + lse", teacher._top_k_and_lse)
    teacher_cache._storage_error = timed(times, "storage error", teacher_cache._storage_error)
    teacher_cache._write_shard = timed(times, "shard writes (thread)", teacher_cache._write_shard)
    shards = teacher_cache._compute_shards

    def loop_only(*a, **k):  # the components of the timed loop only (not the head check or int8's scale fit)
        times.clear()
        return shards(*a, **k)

    teacher_cache._compute_shards = loop_only
    tmp = tempfile.mkdtemp(prefix="bench-cache-parts-")
    config = ROOT / "configs/smollm2/teacher_cache.yaml"
    base = [f"data.path={SHARED}/data/minillm_eval/dolly/valid.jsonl", "data.response_field=output",
            f"data.limit={args.rows}", "tokenize.max_prompt_length=256", "tokenize.max_length=512",
            "cache.batch_size=8", f"cache.rows_per_shard={max(args.rows // 4, 1)}"]
    cfg = load_config(TeacherCacheConfig, config, [*base, f"out_dir={tmp}/warm"])
    bare_loop(cfg, False)  # warm-up
    for r in range(args.rounds):
        f0 = faults_mb()
        tokens, bare_s = bare_loop(cfg, False)
        bare_faults = faults_mb() - f0
        out = teacher_cache.run(load_config(TeacherCacheConfig, config,
                                            [*base, f"out_dir={tmp}/r{r}", *MODES[args.mode], *args.set]))
        st = json.loads((out / teacher_cache.STATS_FILE).read_text())
        loop_s = st["tokens"] / st["tokens_per_s"]
        print(f"round {r + 1}, {args.mode}: bare loop {bare_s:.2f} s ({bare_faults:.0f} MB faults), stage 1 loop "
              f"{loop_s:.2f} s: stage 1 / bare {st['tokens_per_s'] / (tokens / bare_s):.3f}")
        for k, v in times.items():
            print(f"  {k:<32} {v:8.3f}")


if __name__ == "__main__":
    main()
