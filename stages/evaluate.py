"""Stage `eval`: every model answers every suite under one preset (pipeline/evaluate/suites.py); scores, response lengths
and the references' NLL are stored per (checkpoint hash, suite, preset, seed) and never computed twice.

Per model: suites are read and prompts encoded first (bad data fails before a model loads), then the NLL pass (one
hf model) for suites that lack it, then generation (one model or one vLLM engine for all suites and seeds) for
the pairs that lack a result; each pair's file is written as soon as it is done, so a killed eval resumes at the
next unfinished pair. Ends with `results-<preset>.json` per model and a table on stdout.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline import lock
from pipeline.config import ConfigError, EvalConfig, ModelRef
from pipeline.evaluate import harness
from pipeline.evaluate.metrics import score_suite
from pipeline.evaluate.report import harness_table, markdown_table, metrics_table
from pipeline.evaluate.suites import (
    Suite,
    checkpoint_hash,
    encode_left,
    expand_runs,
    length_stats,
    load_suite,
    lookup_preset,
    lookup_suite,
    max_positions,
    nll_path,
    pair_path,
    postprocess,
    preset_key,
    read_result,
    reference_nll,
    resolve_run,
    summarise,
    write_summary,
)
from pipeline.generate import open_generator, resolve_backend
from pipeline.io_utils import write_json
from pipeline.models.load import check_model_ref, load_model, load_tokenizer


@dataclass(frozen=True)
class Target:
    name: str
    ref: ModelRef
    eval_dir: Path
    role: str  # "student", "teacher" or "model"


def targets(cfg: EvalConfig) -> list[Target]:
    def of_dir(entry: str, role: str) -> Target:
        r = resolve_run(entry)
        return Target(r.name, r.ref, r.eval_dir, role)

    out = [of_dir(r, "student") for r in expand_runs(cfg.runs, "eval")]
    if cfg.teacher:
        out.append(of_dir(cfg.teacher, "teacher"))
    out += [Target(name, ref, Path(cfg.out_dir) / name, "model") for name, ref in cfg.models.items()]
    return out


def _effective_max_new(t: Target, suite: Suite, prompts: list[list[int]], wanted: int, positions: int | None) -> int:
    """max_new_tokens shrunk so the longest prompt plus the answer fits the model's positions."""
    if positions is None:
        return wanted
    longest = max(len(p) for p in prompts)
    if positions - longest < 1:
        raise ConfigError(f"eval {t.name}: suite {suite.name}: prompts of {longest} tokens leave no room to answer in "
                         f"the model's {positions} positions; lower the preset's max_prompt_length")
    return min(wanted, positions - longest)


def evaluate_target(cfg: EvalConfig, t: Target, suites: list[Suite], preset_name: str) -> dict:
    preset = lookup_preset(cfg, preset_name)
    pkey = preset_key(preset_name, preset)
    ckpt = checkpoint_hash(t.ref)
    tokenizer = load_tokenizer(t.ref)
    positions = max_positions(t.ref)
    prompts = {s.name: [encode_left(tokenizer, r.prompt, preset.max_prompt_length) for r in s.rows] for s in suites}
    max_new = {s.name: _effective_max_new(t, s, prompts[s.name], preset.generate.max_new_tokens, positions)
               for s in suites}

    nll_todo = [s for s in suites if cfg.nll and read_result(nll_path(t.eval_dir, ckpt, s.key, preset)) is None]
    tasks = {task: harness.task_key(task, cfg.harness_limit, cfg.harness_fewshot, cfg.harness_include)
             for task in cfg.harness}
    harness_todo = [task for task, key in tasks.items() if read_result(t.eval_dir / ckpt / "harness" / f"{key}.json")
                    is None]
    if nll_todo or harness_todo:  # one hf model for the teacher-forced passes and the harness
        model = load_model(t.ref)
        for s in nll_todo:
            res = reference_nll(model, tokenizer, prompts[s.name], s.rows, max_new[s.name])
            write_json(nll_path(t.eval_dir, ckpt, s.key, preset), {"checkpoint": ckpt, "suite": s.key, **res})
        for task in harness_todo:
            start = time.perf_counter()
            res = harness.run_task(model, tokenizer, task, limit=cfg.harness_limit, num_fewshot=cfg.harness_fewshot,
                                   include=cfg.harness_include, batch_size=cfg.batch_size,
                                   device="cuda" if torch.cuda.is_available() else "cpu")
            write_json(t.eval_dir / ckpt / "harness" / f"{tasks[task]}.json",
                       {"checkpoint": ckpt, "task": task, "key": tasks[task], "limit": cfg.harness_limit,
                        "metrics": res, "wall_s": round(time.perf_counter() - start, 2)})
        del model

    seeds = preset.generate.seeds
    todo = [(s, seed) for s in suites for seed in seeds
            if read_result(pair_path(t.eval_dir, ckpt, s.key, pkey, seed)) is None]
    if todo:
        base = replace(preset.generate, backend=cfg.backend, batch_size=cfg.batch_size,
                       gpu_memory_utilization=cfg.gpu_memory_utilization)
        backend = resolve_backend(base.backend)
        model_len = preset.max_prompt_length + preset.generate.max_new_tokens
        model_len = min(model_len, positions) if positions else model_len
        print(f"eval {t.name}: {len(todo)} (suite, seed) pairs to generate on {backend}; "
              f"{len(suites) * len(seeds) - len(todo)} already stored", flush=True)
        with open_generator(t.ref, tokenizer, base, max_model_len=model_len) as gen:
            for s, seed in todo:
                sampling = replace(base, max_new_tokens=max_new[s.name])
                start = time.perf_counter()
                comps = [c[0] for c in gen.generate(prompts[s.name], sampling, seed, keys=[r.id for r in s.rows],
                                                    progress=f"{t.name} · {s.name} · seed {seed}")]
                preds = [postprocess(c.text) for c in comps]
                scores = score_suite(s.metric, preds, [list(r.references) for r in s.rows])
                write_json(pair_path(t.eval_dir, ckpt, s.key, pkey, seed), {
                    "checkpoint": ckpt, "model": t.ref.path, "suite": s.key, "preset": pkey, "seed": seed,
                    "backend": backend, "max_new_tokens": max_new[s.name], "n": len(preds), "scores": scores,
                    "lengths": length_stats(comps), "wall_s": round(time.perf_counter() - start, 2),
                    "predictions": [{"id": r.id, "prediction": p, "tokens": len(c.token_ids), "finish": c.finish_reason}
                                    for r, p, c in zip(s.rows, preds, comps)],
                })
    per_suite = {}
    for s in suites:
        seeds_res = {}
        for seed in seeds:
            res = read_result(pair_path(t.eval_dir, ckpt, s.key, pkey, seed))
            seeds_res[str(seed)] = {k: res[k] for k in ("scores", "lengths", "wall_s", "backend")}
        nll = read_result(nll_path(t.eval_dir, ckpt, s.key, preset)) if cfg.nll else None
        per_suite[s.name] = {"metric": s.metric, "key": s.key, "n": len(s.rows), "max_new_tokens": max_new[s.name],
                             "seeds": seeds_res, "nll": nll and {k: nll[k] for k in ("nll", "ppl", "tokens")}}
    summary = {"name": t.name, "role": t.role, "model": t.ref.path, "checkpoint": ckpt, "preset": preset_name,
               "preset_key": pkey, "suites": per_suite, "summary": summarise(per_suite)}
    if tasks:
        summary["harness"] = {task: read_result(t.eval_dir / ckpt / "harness" / f"{key}.json")["metrics"]
                              for task, key in tasks.items()}
    write_summary(t.eval_dir, preset_name, summary)
    return summary


def run(cfg: EvalConfig) -> list[dict]:
    preset = lookup_preset(cfg, cfg.preset)
    suites = [load_suite(n, lookup_suite(cfg, n), cfg.data_root, preset.limit) for n in cfg.suites]  # data first
    tgts = targets(cfg)
    for t in tgts:
        check_model_ref(t.ref)
    if cfg.harness:
        harness.require()
    with contextlib.ExitStack() as held:  # one writer per model's results, all taken before any model loads
        for d in dict.fromkeys(t.eval_dir for t in tgts):
            held.enter_context(lock.writer(d, "eval"))
        results = [evaluate_target(cfg, t, suites, cfg.preset) for t in tgts]
    print()
    print(markdown_table(results, [s.name for s in suites]))
    for s in suites:  # every metric, not only the headline one: exact match and the reference's NLL too
        print()
        print(metrics_table(results, s.name))
    if cfg.harness:
        print()
        print(harness_table(results))
    for t in tgts:
        print(f"{t.name}: {t.eval_dir / f'results-{cfg.preset}.json'}")
    return results
