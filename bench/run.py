"""`make bench`: every benchmark side by side in one invocation; bench/results.json and bench/results.md.

Sections, each in its own process (its numbers are its own) and in this order:
1. cache      stage-1 tokens/s vs a bare teacher forward over the same batches, the bare loop run right before each
              variant (exact bf16, compact int8, cross-tokenizer); bytes per response token by column; the
              reconstruction KL (bench/cache.py, SmolLM2-135M-Instruct over Dolly)
2. train      stage-2 step time and peak memory from the cache vs online KD with the teacher resident; every
              objective's step time relative to sft next to its FLOP floor; fused chunks vs naive loss at the 262k
              Gemma-3 vocabulary (bench/train.py, bench/floor.py)
3. rollout    generated tokens/s, hf vs vllm (bench/rollout.py; vllm where `make install-vllm` installed it)
4. alignment  exact-pair and chunk alignment coverage and throughput on the real tokenizers (bench/alignment.py)

BENCH_SCALE multiplies rows, steps and prompts: 0.5 (make bench's default) took 19 minutes on 2 CPU cores; a GPU
machine takes 4 or more. `--sections cache,train` runs some of them and keeps the others' last results.

    python bench/run.py [--scale 1] [--sections cache,train,rollout,alignment]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHARED, show  # noqa: E402,F401  (the project on sys.path, hub off)

OUT = ROOT / "bench"
FORMAT = 2  # 2: every ratio from >= 3 rounds with its min-max
WORK = ROOT / "runs/bench"


def commands(scale: float) -> dict[str, list[str]]:
    n = lambda x: str(max(1, round(x * scale)))  # noqa: E731
    return {
        # every ratio from 3 interleaved rounds (bench/common.py: median and min-max, or unstable)
        "cache": ["bench/cache.py", "--rows", n(24), "--teacher", "smollm2", "--rounds", "3"],
        # each variant is its own process; the default's 8 variants (BENCH_FULL=1: all 16), the 262k student's take
        # a minute or more each
        "train": ["bench/train.py", "--rows", str(max(8, round(24 * scale))),  # 8: the x4 micro-batch
                  "--steps", str(max(4, round(5 * scale))), "--warmup", "1", "--rounds", "3",
                  *(["--full"] if os.environ.get("BENCH_FULL") == "1" else [])],
        "rollout": ["bench/rollout.py", "--prompts", n(128), "--smol-prompts", n(8), "--rounds", "3", "--skip-round"],
        "alignment": ["bench/alignment.py", "--rows", n(100), "--rounds", "3"],
    }


def machine() -> dict:
    import torch

    out = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()
    except OSError:
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            out["cpu"] = line.split(":", 1)[1].strip()
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=float(os.environ.get("BENCH_SCALE", "0.5")))
    ap.add_argument("--sections", default="cache,train,rollout,alignment")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results_file = OUT / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results.setdefault("sections", {})
    cmds = commands(args.scale)
    for name in args.sections.split(","):
        if name not in cmds:
            sys.exit(f"unknown section {name!r} (known: {', '.join(cmds)})")
        out = WORK / f"{name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, *cmds[name], "--json", str(out)]
        print(f"\n=== bench {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode != 0 or not out.exists():
            sys.exit(f"bench {name} failed (exit {proc.returncode}); the other sections' results are unchanged")
        results["sections"][name] = {"format": FORMAT, "command": " ".join(cmds[name]), "wall_s": time.perf_counter() - t0,
                                     "scale": args.scale, "machine": machine(), **json.loads(out.read_text())}
        write(results)  # after every section: an interrupted run keeps what it measured
    print(f"\nresults: {results_file} and {OUT / 'results.md'}")


def write(results: dict) -> None:
    from pipeline.io_utils import atomic_write_text

    atomic_write_text(OUT / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(OUT / "results.md", markdown(results))


def _kl(x: float) -> str:
    return "0 (lossless)" if x == 0 else f"{x:.1e}"


def markdown(results: dict) -> str:
    # a section kept from a run of an older bench (no spreads) is named, not shown: its numbers are not figures
    old = [k for k, v in results["sections"].items() if v.get("format", 1) < FORMAT]
    sec = {k: v for k, v in results["sections"].items() if k not in old}
    lines = ["# make bench", ""]
    if old:
        lines += [f"- {', '.join(old)}: from an older bench without spreads, not shown (`python bench/run.py --sections "
                  f"{','.join(old)}` measures {'it' if len(old) == 1 else 'them'} again)"]
    for name, r in sec.items():
        m = r["machine"]
        lines.append(f"- {name}: `python {r['command']}` (BENCH_SCALE {r['scale']:g}), {r['wall_s'] / 60:.1f} min on "
                     f"{m.get('gpu') or m.get('cpu', m['machine'])}, {m['cpus']} CPUs, {m['torch_threads']} torch "
                     f"threads, torch {m['torch']}, {m['date']}, commit {m.get('commit', '?')}")
    if "cache" in sec:
        c = sec["cache"]
        lines += ["", f"## Stage 1: teacher cache (SmolLM2-135M-Instruct, {c['rows']} Dolly rows, {c['tokens']} tokens, "
                  f"batch {c['batch_size']})", "",
                  "The bare loop is the teacher's decoder and head at response positions over the same batches, run "
                  "right before each variant; stage 1 adds tokenization and alignment, top-k and log-sum-exp, "
                  "hidden-state encoding and fsync'd Arrow writes.", "",
                  "| variant | stage 1 tok/s | bare tok/s | stage 1 / bare (min-max) | bytes / response token | hidden | "
                  "reconstruction KL | top-k + tail KL |", "|---|---:|---:|---|---:|---|---:|---:|"]
        for v in c["variants"]:
            lines.append(f"| {v['variant']} | {v['stage1_tok_s']:.0f} | {v['bare_tok_s']:.0f} | {show(v['ratio'])} | "
                         f"{v['bytes_per_response_token']:.0f} | {v['hidden_encoding']} | {_kl(v['storage_kl_mean'])} | "
                         f"{v['topk_tail_kl_mean']:.2e} |")
        cols = sorted({k for v in c["variants"] for k in v["bytes_by_column"]},
                      key=lambda k: -max(v["bytes_by_column"].get(k, 0) for v in c["variants"]))
        lines += ["", "Bytes per response token by column:", "",
                  "| column | " + " | ".join(v["variant"] for v in c["variants"]) + " |",
                  "|---|" + "---:|" * len(c["variants"])]
        for k in cols:
            lines.append(f"| {k} | " + " | ".join(f"{v['bytes_by_column'].get(k, 0):.1f}" for v in c["variants"]) + " |")
    if "train" in sec:
        t = sec["train"]
        for p in t["pairs"].values():
            sft = p["variants"]["sft"]
            lines += ["", f"## Stage 2: {p['label']}", "",
                      f"Micro-batch {p['micro_batch']}, fp32, {t['rows']} Dolly rows; a variant's step time is the median "
                      f"of its timed steps; every ratio is taken within a round (the variants of a round run back to "
                      f"back) and shown as its median and min-max over {t['rounds']} interleaved rounds, or as unstable "
                      f"when that range exceeds 10% of it. The student head is {p['head_share_of_sft']:.0%} of sft's FLOP "
                      f"floor. sft runs at {show(sft['gflop_s'], ' GFLOP/s', 1)} of its floor; a bare torch.mm loop over "
                      f"its products at their shapes runs at {show(p['matmul_gflop_s'], ' GFLOP/s', 1)}: sft / bare "
                      f"matmul {show(sft['of_matmul_rate'])}.", "",
                      "| variant | ms / step | peak RSS MB | x sft | floor x sft | measured / floor |",
                      "|---|---:|---:|---|---:|---|"]
            for v, m in p["variants"].items():
                lines.append(f"| {v} | {m['step_s'] * 1000:.0f} | {m['peak_mb']:.0f} | {show(m['x_sft'])} | "
                             f"{m['floor_x_sft']:.2f} | {show(m['measured_over_floor'])} |")
            r = p["ratios"]
            if "online_over_cache_time" in r:
                lines += ["", f"kd from the cache vs online (teacher resident): {show(r['online_over_cache_time'])} "
                          f"faster per step; peak memory {show(r['cache_over_online_peak'])} of online."]
            if "fused_over_naive_time" in r:
                a, b = p["variants"]["dskd_eta x4"], p["variants"]["dskd_eta x4 naive"]
                lines += ["", f"Fused chunks vs naive loss at the {p['dims']['v_s']:,}-token vocabulary (dskd_eta, "
                          f"micro-batch {4 * p['micro_batch']}): fused {a['step_s'] * 1000:.0f} ms / {a['peak_mb']:.0f} "
                          f"MB, naive (every position's logits at once) {b['step_s'] * 1000:.0f} ms / "
                          f"{b['peak_mb']:.0f} MB: time {show(r['fused_over_naive_time'])}, peak memory "
                          f"{show(r['fused_over_naive_peak'])} of naive; above sft's peak (what the 4x micro-batch "
                          f"and its loss add to the weights, optimizer state and gradients both hold): "
                          f"{show(r['fused_over_naive_peak_above_sft'])}."]
            against = [k.removesuffix(" fused_over_checkpointed_time") for k in r if k.endswith(" fused_over_checkpointed_time")]
            if against:
                lines += ["", "Fused chunks vs the checkpointed chunks they replaced (each chunk's vocabulary-sized "
                          "forward run again in backward), same run:", "",
                          "| variant | time fused / checkpointed | peak fused / checkpointed |", "|---|---|---|"]
                lines += [f"| {v} | {show(r[f'{v} fused_over_checkpointed_time'])} | "
                          f"{show(r[f'{v} fused_over_checkpointed_peak'])} |" for v in against]
    if "rollout" in sec:
        ro = sec["rollout"]
        rows = ro["throughput"]
        lines += ["", f"## Rollouts: generated tokens/s (median and min-max over {ro.get('rounds', 1)} interleaved rounds)",
                  "", "| model | backend | prompts | tokens | tok/s | start s |", "|---|---|---:|---:|---|---:|"]
        for r in rows:
            rate = show(r["tokens_per_s_spread"], "", 0) if "tokens_per_s_spread" in r else f"{r['tokens_per_s']:.0f}"
            lines.append(f"| {r['model']} | {r['backend']} | {r['prompts']} | {r['generated_tokens']} | {rate} | "
                         f"{r['start_s']:.1f} |")
        for model in dict.fromkeys(r["model"] for r in rows):
            if model in ro.get("vllm_over_hf", {}):
                lines.append(f"\n{model}: vllm / hf = {show(ro['vllm_over_hf'][model])}")
            elif not any(r["model"] == model and r["backend"] == "vllm" for r in rows):
                lines.append(f"\n{model}: vllm not installed here (`make install-vllm`)")
    if "alignment" in sec:
        a = sec["alignment"]
        lines += ["", f"## Token alignment ({a['rows']} Dolly responses)", "",
                  "| student <- teacher | exact coverage | chunk coverage | exact pairs/s | chunks pairs/s | both pairs/s | "
                  "chunks / exact time | both / exact time |", "|---|---:|---:|---:|---:|---:|---|---|"]
        for r in a["pairs"]:
            ratios = (f"{show(r['chunks_over_exact'])} | {show(r['both_over_exact'])}" if "chunks_over_exact" in r
                      else "- | -")
            lines.append(f"| {r['student']} <- {r['teacher']} | {r['exact_coverage']:.3f} | {r['chunk_coverage']:.3f} | "
                         f"{r['exact_pairs_s']:.0f} | {r['chunks_pairs_s']:.0f} | {r['both_pairs_s']:.0f} | {ratios} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
