"""`make bench-objectives`: stage-2 step time of every objective relative to `sft`, on the tiny default.

Each objective trains the shipped tiny-default student (configs/tiny/distill.yaml: micro-batch 32, fp32, ZeRO 0)
from the tiny default's caches for `--steps` steps, one after the other in this process; the step time is taken
from the run's own metrics.jsonl between step `--warmup` and the last step, so start-up is excluded. Same-tokenizer
objectives read the shipped cache (runs/tiny/cache, built by `make teacher-cache`); cross-tokenizer ones a cache
with the SentencePiece-style student tokenizer and the teacher's input embeddings, built here once if missing.
Ratios are against `sft` on the same cache and student. The objectives run interleaved for `--rounds` rounds and
each reports its median, so drift of a shared machine hits every objective alike.

    python bench/objectives.py [--steps 40] [--warmup 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

from common import ROOT, SHARED  # noqa: E402,F401  (the project on sys.path, hub off)

from pipeline.config import DistillConfig, TeacherCacheConfig, load_config  # noqa: E402
from stages import distill, teacher_cache  # noqa: E402

SAME = ["sft", "kd", "dskd", "dskd_v2", "uld"]
CROSS = ["sft", "dskd_eta", "dskd_cma", "uld", "mined", "overlap_kd", "alm", "alm_eta"]


def step_time(cfg: DistillConfig, warmup: int) -> float:
    run_dir = distill.run(cfg, force=True)
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    last = max(rows)
    return (rows[last]["elapsed_s"] - rows[warmup]["elapsed_s"]) / (last - warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.chdir(ROOT)
    if not (ROOT / "runs/tiny/cache/CURRENT").exists():
        sys.exit("run `make teacher-cache` first (the tiny default's cache)")
    xtok = load_config(TeacherCacheConfig, ROOT / "configs/tiny/teacher_cache_xtok.yaml")  # with embeddings
    xcache = teacher_cache.run(xtok)
    out = tempfile.mkdtemp(prefix="bench-objectives-")
    # step time only: no validation passes or intermediate checkpoints inside the timed steps
    common = [f"train.steps={args.steps}", f"train.log_every={args.warmup}", f"out_dir={out}", "valid.every=0",
              "checkpoint.every=0", "checkpoint.keep_best=0"]
    runs = [
        ("same tokenizer", objective, [])
        for objective in SAME
    ] + [
        ("cross tokenizer", objective, [f"cache={xcache}", "student.path=runs/tiny/assets/student-init-metaspace"])
        for objective in CROSS
    ]
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for pairing, objective, extra in runs:
                cfg = load_config(DistillConfig, ROOT / "configs/tiny/distill.yaml",
                                  [*common, *extra, f"loss.objective={objective}", f"run_name={pairing[:5]}-{objective}"])
                samples.setdefault((pairing, objective), []).append(step_time(cfg, args.warmup))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    results: list[tuple[str, dict[str, float]]] = []
    for (pairing, objective), ts in samples.items():
        if not results or results[-1][0] != pairing:
            results.append((pairing, {}))
        results[-1][1][objective] = statistics.median(ts)
    print(f"\nstage-2 step time on the tiny default (micro-batch 32, fp32, 1 process), steps {args.warmup}-{args.steps}, "
          f"median of {args.rounds} interleaved rounds:")
    print(f"{'cache':<16} {'objective':<10} {'ms/step':>8} {'x sft':>6}")
    for pairing, times in results:
        for objective, t in times.items():
            print(f"{pairing:<16} {objective:<10} {1000 * t:8.1f} {t / times['sft']:6.2f}")


if __name__ == "__main__":
    main()
