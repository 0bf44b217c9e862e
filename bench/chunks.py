"""The loss alone at the 262k vocabulary: fused chunks of several sizes vs naive, alternating in one process.

    python bench/chunks.py [--objective dskd_eta] [--rows 8] [--chunks auto,32,64,128] [--rounds 3] [--no-memory]
    python bench/chunks.py --rates [--rounds 3]
    python bench/chunks.py --split [--chunks auto] [--rounds 3] [--no-memory]

`--rates`: the student head's three products alone at the Gemma-3 prune's shape (V x d), by rows per product
(a chunk's 64, two chunks' 128 as one joint product takes them, 256, and 433 / 866: naive's at 10 rows):
logits (rows x d) @ W^T, the rows' gradient (rows x V) @ W, the weight's gradient W' += (rows x V)^T (rows x d), in
GFLOP/s, median and min-max over interleaved rounds. What a chunk of positions costs beyond FLOPs.
`--split`: after the timings, each variant's forward + backward once per round under torch's profiler, its CPU time
split into the matrix products (aten::mm, addmm, addmm_, bmm) and everything else, fused / naive for each, and the
products by shape (their time and GFLOP/s).

SmolLM2-135M's cache -> the 6-layer Gemma-3 prune (`make bench-train`'s vocab pair, built here if missing): the
first `--rows` cached rows as one micro-batch, the student's hidden states computed once and detached, so each
timing is the objective's forward and backward alone (no body, no optimizer, no tied-embedding gradient). The
dskd family's count of agreeing rows, taken before the fused chunks, is timed apart. Rounds alternate the variants;
each variant's first two calls are warm-up. Memory (after the timings, unless --no-memory): each variant's first
forward + backward in a process of its own, its peak resident memory above the process's before it (Linux's VmHWM,
reset through /proc/self/clear_refs; glibc's default allocator there, so that a freed vocabulary-sized tensor leaves
the resident memory at once and the peak is what was alive), in --rounds rounds; fused / naive within a round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import ROOT, malloc_trim, show, spread, status_mb  # noqa: F401  (ROOT: the project on sys.path, hub off)
from train import setup

import pipeline.objectives.dual_space as dual_space
from pipeline.cache.batch import collate_cache_rows
from pipeline.config import LossConfig, ModelRef
from pipeline.cpu import keep_freed_memory
from pipeline.models.load import decoder_hidden, load_model, load_tokenizer, own_memory
from pipeline.objectives.objective import Objective
from pipeline.objectives.setup import build_projectors, student_side, teacher_from_cache
from pipeline.train.sources import open_for_student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objective", default="dskd_eta")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--chunks", default="auto,32,64,128",
                    help="fused chunk sizes in positions, `auto`: stage 2's default, each space's chunks from its "
                         "own vocabulary (naive always runs)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--peak-of", type=int, help=argparse.SUPPRESS)  # a child: this chunk size's peak memory
    ap.add_argument("--rates", action="store_true", help="the head's products alone, by rows per product")
    ap.add_argument("--split", action="store_true", help="each variant's time in matrix products and the rest")
    args = ap.parse_args()
    if args.rates:
        keep_freed_memory()
        rates(args.rounds)
        return
    if args.peak_of is None:  # a child measuring memory keeps glibc's default: a freed large tensor goes back at once
        keep_freed_memory()  # as stage 2 runs
    cache, student_dir = setup("vocab", 12)
    tok = load_tokenizer(ModelRef(path=str(student_dir)))
    reader = open_for_student(cache, tok)
    student = load_model(ModelRef(path=str(student_dir)))
    own_memory(student)
    cfg = LossConfig(objective=args.objective)
    teacher, vmap = teacher_from_cache(cfg, reader, tok, "cpu")
    proj = build_projectors(cfg, student, teacher, vmap, weights_follow=True)
    batch = collate_cache_rows([reader[i] for i in range(args.rows)], tok.pad_token_id or 0)
    with torch.no_grad():
        hidden = decoder_hidden(student, batch.input_ids, batch.attention_mask)
    counting = {"s": 0.0}
    count = dual_space.agreement

    def timed_count(*a, **k):
        t0 = time.perf_counter()
        out = count(*a, **k)
        counting["s"] += time.perf_counter() - t0
        return out

    dual_space.agreement = timed_count
    if args.peak_of is not None:
        run_once = Objective(cfg, teacher, proj, chunk_positions=args.peak_of)
        side = student_side(student, batch, hidden.detach().requires_grad_())
        malloc_trim()  # what setup freed
        before = status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the resident memory now
        run_once(batch, side, normaliser=100.0).loss.backward()
        print(json.dumps({"peak_mb": status_mb("VmHWM") - before}))
        return
    variants = {("fused, auto" if c == "auto" else f"fused, {c} positions"): 0 if c == "auto" else int(c)
                for c in args.chunks.split(",")} | {"naive": 1 << 30}
    objectives = {v: Objective(cfg, teacher, proj, chunk_positions=c) for v, c in variants.items()}

    def run(v: str) -> tuple[float, float]:
        side = student_side(student, batch, hidden.detach().requires_grad_())
        counting["s"] = 0.0
        t0 = time.perf_counter()
        objectives[v](batch, side, normaliser=100.0).loss.backward()
        total = time.perf_counter() - t0
        student.zero_grad(set_to_none=True)
        proj.zero_grad(set_to_none=True)
        return total, counting["s"]

    for v in variants:
        run(v)
        run(v)
    got: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            got[v].append(run(v))
    n = int((batch.labels != -100).sum())
    naive = [t for t, _ in got["naive"]]
    print(f"bench-chunks: {args.objective}, {args.rows} rows ({n} label positions), V {student.get_output_embeddings().weight.shape[0]:,}, "
          f"{torch.get_num_threads()} threads; forward + backward of the loss, median of {args.rounds} rounds")
    for v, xs in got.items():
        t = [x for x, _ in xs]
        ratio = [a / b for a, b in zip(t, naive)]
        print(f"  {v:<24} {statistics.median(t):6.2f} s (count of agreeing rows {statistics.median(c for _, c in xs):.2f} s)"
              f"  / naive {statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f})")
    if args.split:
        split(variants, run, args.rounds)
    if not args.memory:
        return
    peaks: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, c in variants.items():
            child = [sys.executable, __file__, "--objective", args.objective, "--rows", str(args.rows), "--peak-of", str(c)]
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            peaks[v].append(json.loads(out)["peak_mb"])
    print(f"  peak resident memory of the loss's forward + backward above the process's before it, {args.rounds} rounds:")
    for v, xs in peaks.items():
        print(f"  {v:<24} {statistics.median(xs):6.0f} MB  / naive {show(spread(a / b for a, b in zip(xs, peaks['naive'])))}")


PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"}


def split(variants: dict, run, rounds: int) -> None:
    """`--split`: per variant and round, the seconds of CPU time in matrix products and in everything else; and per
    product shape, its calls' time and GFLOP/s (median over rounds)."""
    got: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    shapes: dict[str, dict[tuple, list[tuple[float, float]]]] = {v: {} for v in variants}
    for _ in range(rounds):
        for v in variants:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                run(v)
            ops = prof.key_averages()
            products = sum(e.self_cpu_time_total for e in ops if e.key in PRODUCTS) / 1e6
            got[v].append((products, sum(e.self_cpu_time_total for e in ops) / 1e6 - products))
            for e in prof.key_averages(group_by_input_shape=True):
                mats = [s for s in e.input_shapes if len(s) == 2]
                if e.key in PRODUCTS and len(mats) >= 2:
                    # the two factors: addmm's last two (its output / addend first), mm's first two (`out=` last)
                    a, b = (mats[-2], mats[-1]) if e.key.startswith("aten::addmm") else (mats[0], mats[1])
                    flop = 2 * a[0] * a[1] * b[1] * e.count
                    shapes[v].setdefault((e.key, str(mats)), []).append((e.self_cpu_time_total / 1e3, flop))
    print(f"  CPU time in matrix products and the rest (torch's profiler, {rounds} rounds):")
    for v, xs in got.items():
        print(f"  {v:<24} products {statistics.median(a for a, _ in xs):5.2f} s, the rest {statistics.median(b for _, b in xs):5.2f} s"
              f"  / naive: products {show(spread(a / n for (a, _), (n, _) in zip(xs, got['naive'])))}, "
              f"the rest {show(spread(b / n for (_, b), (_, n) in zip(xs, got['naive'])))}")
    for v, by in shapes.items():
        print(f"  {v}: products by shape, ms a round (median), GFLOP/s (min-max over rounds)")
        for (op, mats), xs in sorted(by.items(), key=lambda kv: -statistics.median(t for t, _ in kv[1]))[:8]:
            rate = [f / t / 1e6 for t, f in xs if t > 0]
            print(f"    {op:<12} {mats:<44} {statistics.median(t for t, _ in xs):7.1f} ms  "
                  f"{min(rate):4.0f}-{max(rate):4.0f} GFLOP/s")


def rates(rounds: int, rows=(64, 128, 256, 433, 866)) -> None:
    """GFLOP/s of the head's three products by rows per product (`--rates`)."""
    _, student_dir = setup("vocab", 12)
    w = load_model(ModelRef(path=str(student_dir))).get_output_embeddings().weight.detach().float().contiguous()
    v, d = w.shape
    gen = torch.Generator().manual_seed(0)
    got: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds):
        for r in rows:
            x, dz, grad = torch.randn(r, d, generator=gen), torch.randn(r, v, generator=gen), torch.zeros(v, d)
            products = {"logits": lambda x=x: x @ w.t(), "rows' gradient": lambda dz=dz: dz @ w,
                        "weight's gradient": lambda x=x, dz=dz, grad=grad: grad.addmm_(dz.t(), x)}
            for name, f in products.items():
                f()  # (first touch of its output)
                t0 = time.perf_counter()
                f()
                got.setdefault((r, name), []).append(2 * r * v * d / (time.perf_counter() - t0) / 1e9)
    print(f"bench-chunks --rates: the head's products at V {v:,} x d {d}, {torch.get_num_threads()} threads, "
          f"GFLOP/s over {rounds} interleaved rounds")
    for (r, name), xs in got.items():
        print(f"  {r:>4} rows  {name:<18} {show(spread(xs), ' GFLOP/s', 0)}")


if __name__ == "__main__":
    main()
