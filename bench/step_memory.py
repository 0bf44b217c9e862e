"""Where a stage-2 step's peak memory goes at the 262k vocabulary: resting state, the step's own tensors, allocator.

    python bench/step_memory.py [--variants "dskd_eta x4,dskd_eta x4 naive"] [--malloc keep,default] [--step 3]
    python bench/step_memory.py --reuse

`--reuse`: whether glibc, told to keep freed memory as stage 2 does, gives a freed (128 x 262,144) float32 tensor's
block to the next tensor of that size: each pass's address and the pages it faulted in (docs/results.md, "Why
glibc holds that much"; run it under THP_MEM_ALLOC_ENABLE=1 or GLIBC_TUNABLES to see the remedies there).

`make bench-train`'s vocab pair (SmolLM2-135M's cache -> the 6-layer Gemma-3 prune, built there if missing), each
variant and allocator setting (`DSKD_CPU_MALLOC`) in a process of its own, stage 2 as users run it. Three figures
per run, in MB:
- resting: the resident memory between steps once glibc has returned its free pages (`malloc_trim` after the step
  before `--step`, in the profiled run): weights, optimizer state, the cache's rows, the runtime;
- own tensors: the peak, over step `--step`, of the bytes of the tensors torch has allocated in that step (torch's
  profiler, memory events), with the largest of them alive at that moment and what allocated them, plus the fused
  chunks' buffers taken from malloc (`chunks.buffer`), which the profiler does not see (alive through the chunks);
- peak resident: Linux's VmHWM at the end of the step (the whole process's high-water mark so far), in a run
  without the profiler (its trace takes memory of its own); own tensors come from a profiled run of the same step.
peak resident - resting - own tensors is what the allocator holds beyond them (freed blocks kept for reuse, gaps).
The own-tensor figure is the same in every run of the same variant (same batches, same allocations); the resident
ones move by tens of MB between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, malloc_trim, status_mb  # noqa: F401  (ROOT: the project on sys.path, hub off)

BIG = 16 << 20  # the tensors listed at the peak: these bytes and above


def own_tensors(trace: dict) -> tuple[float, list[tuple[float, str]]]:
    """(the peak MB of the bytes allocated and not yet freed since the trace began, on the CPU; the tensors of at
    least BIG bytes alive then, as (MB, the ops open when each was allocated))."""
    ops = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X"), key=lambda e: e["ts"])
    mem = sorted((e for e in trace["traceEvents"] if e.get("name") == "[memory]"
                  and e["args"].get("Device Type", 0) == 0), key=lambda e: e["ts"])
    live: dict[int, tuple[int, float]] = {}
    total, best, at_best = 0, 0, {}
    for e in mem:
        size, addr = e["args"]["Bytes"], e["args"]["Addr"]
        if size > 0:
            live[addr] = (size, e["ts"])
        else:
            live.pop(addr, None)
        total += size
        if total > best:
            best, at_best = total, dict(live)

    def opened(ts: float) -> str:
        inner = [o["name"] for o in ops if o["ts"] <= ts <= o["ts"] + o.get("dur", 0)
                 and not o["name"].startswith("PyTorch Profiler")]
        return " > ".join(inner[-3:]) or "(outside any op)"

    big = sorted(((size / 2**20, opened(ts)) for size, ts in at_best.values() if size >= BIG), reverse=True)
    return best / 2**20, big


def child(variant: str, step: int, out: Path, profile: bool) -> None:
    """One variant's run: the resident peak after `step` and the steps' times, or (`profile`: its trace takes
    memory of its own, its trim time) the resting memory before `step` and its own tensors' peak."""
    import torch
    import train as bench_train

    from pipeline.objectives import chunks
    from stages import distill

    real = distill._step
    got: dict = {}

    def step_fn(p, b, s, logged):
        if s != step or not profile:
            t0 = time.perf_counter()
            m = real(p, b, s, logged)
            got.setdefault("step_s", []).append(time.perf_counter() - t0)
            if s == step - 1 and profile:
                malloc_trim()
                got["resting_mb"] = status_mb("VmRSS")
            if s == step:
                got["peak_mb"] = status_mb("VmHWM")
            return m
        from_malloc.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            m = real(p, b, s, logged)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            got["own_mb"], got["big"] = own_tensors(json.loads(Path(f.name).read_text()))
        # the chunks' buffers from malloc (`chunks.buffer`: the head's (V x d) gradient, the head rows') are not
        # torch's allocations, so the profiler does not see them; each is alive through the chunks, where the peak is
        extra = sum(from_malloc) / 2**20
        got["own_mb"] += extra
        got["big"] = sorted(got["big"] + [(mb / 2**20, "chunks.buffer (malloc)") for mb in from_malloc
                                          if mb >= BIG], reverse=True)
        return m

    from_malloc: list[int] = []
    real_buffer = chunks.buffer

    def counted_buffer(shape, dtype, device):
        t = real_buffer(shape, dtype, device)
        if chunks.from_malloc(shape, dtype, device):
            from_malloc.append(t.numel() * t.element_size())
        return t

    chunks.buffer = counted_buffer

    distill._step = step_fn
    r = bench_train.OUT
    bench_train.worker("vocab", variant, r / "cache-vocab", r / "student-vocab", step,
                       f"step-memory-{variant.replace(' ', '-')}")
    out.write_text(json.dumps(got))


def reuse(passes: int = 5) -> None:
    """`--reuse`: a (128 x 262,144) float32 tensor allocated, filled and freed `passes` times."""
    import resource

    import torch

    from pipeline.cpu import keep_freed_memory

    keep_freed_memory()
    moved = []
    for i in range(passes):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(128, 262_144)
        x.fill_(1.0)
        moved.append(x.data_ptr())
        del x
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(f"  pass {i + 1}: at {moved[-1]:#x} ({(moved[-1] - moved[0]) / 2**20:+.0f} MB from the first), "
              f"{faults} pages faulted in")
    print(f"  the same block each pass: {len(set(moved)) == 1}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="dskd_eta x4,dskd_eta x4 naive")
    ap.add_argument("--malloc", default="keep,default", help="DSKD_CPU_MALLOC settings to run each variant under")
    ap.add_argument("--step", type=int, default=4, help="the step measured (>= 2: the one before it rests)")
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reuse", action="store_true", help="a freed vocabulary-sized tensor's block, taken again?")
    args = ap.parse_args()
    if args.reuse:
        reuse()
        return
    if args.step < 2:
        sys.exit("--step must be >= 2 (the step before it gives the resting memory)")
    os.chdir(ROOT)
    if args.child:
        child(args.child, args.step, Path(args.out), args.profile)
        return
    import train as bench_train

    bench_train.setup("vocab", args.rows)
    variants, mallocs = args.variants.split(","), args.malloc.split(",")
    got: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        # own tensors once per variant (the allocator does not change them), resident memory per setting
        for variant, malloc, profile in [(v, mallocs[0], True) for v in variants] + \
                                        [(v, m, False) for m in mallocs for v in variants]:
            out = Path(tmp) / "got.json"
            env = {**os.environ, "DSKD_CPU_MALLOC": malloc}
            cmd = [sys.executable, __file__, "--child", variant, "--step", str(args.step), "--out", str(out)]
            proc = subprocess.run(cmd + (["--profile"] if profile else []), env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{variant} ({malloc}) failed:\n{proc.stderr[-4000:]}")
            got[variant, None if profile else malloc] = json.loads(out.read_text())
    print(f"step {args.step} of stage 2, vocab pair (x4: micro-batch 8), MB")
    for variant in variants:
        own = got[variant, None]
        print(f"  {variant:<18} own tensors {own['own_mb']:6.0f}, the largest alive at their peak:")
        for mb, where in own["big"][:12]:
            print(f"      {mb:7.1f} MB  {where[:110]}")
    last = variants[-1]
    for malloc in mallocs:
        for variant in variants:
            r, own = got[variant, malloc], got[variant, None]["own_mb"]
            r["resting_mb"] = got[variant, None]["resting_mb"]
            print(f"  {variant:<18} DSKD_CPU_MALLOC={malloc:<7} resting {r['resting_mb']:6.0f}  own tensors {own:6.0f}  "
                  f"peak resident {r['peak_mb']:6.0f}  allocator beyond them {r['peak_mb'] - r['resting_mb'] - own:6.0f}"
                  f"  (steps 2-{args.step}: {statistics.median(r['step_s'][1:]):.1f} s each)"
                  f"  | / {last}: own tensors {own / got[last, None]['own_mb']:.2f}x, peak resident "
                  f"{r['peak_mb'] / got[last, malloc]['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
