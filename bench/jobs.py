"""Two jobs on one machine: the built-in default's `dskd distill` (300 steps, make's pin: AVX2, 2 threads) alone, and
two of them with different run names started together, interleaved over rounds; the pair's wall time over the solo's
is the figure (the README's "two jobs on one machine"). `--unmitigated` adds a pair with libgomp's default spin-wait
forced (GOMP_SPINCOUNT=300000 in both: what every job did before the jobs registry), the 25x-per-step case.

    make bench-jobs                       # 3 rounds, then one unmitigated pair (about 6 min on 2 cores)
    python bench/jobs.py --rounds 5 --no-unmitigated

Needs the default's cache and SFT'd student (`make teacher-cache student-sft`). Run it alone on the machine."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, show, spread

PIN = {"DSKD_CPU_ISA": "avx2", "DSKD_CPU_THREADS": "2"}  # what make sets for configs/tiny


def distill(out: str, name: str, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.cli", "distill", "--config", "configs/tiny/distill.yaml",
                             "--set", f"out_dir={out}", "--set", f"run_name={name}", "--force"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **PIN, **(extra_env or {})})


def timed(*procs: subprocess.Popen) -> float:
    t0 = time.perf_counter()
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"distill failed:\n{err[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--unmitigated", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="dskd-bench-jobs-")
    solo, pair = [], []
    for r in range(args.rounds):
        solo.append(timed(distill(out, f"solo{r}")))
        pair.append(timed(distill(out, f"a{r}"), distill(out, f"b{r}")))
        print(f"round {r + 1}: solo {solo[-1]:.1f} s, pair {pair[-1]:.1f} s ({pair[-1] / solo[-1]:.2f}x)", flush=True)
    ratio = spread(p / s for p, s in zip(pair, solo))
    print(f"two jobs side by side / one alone: {show(ratio)} over {args.rounds} rounds; solo "
          f"{min(solo):.1f}-{max(solo):.1f} s")
    if args.unmitigated:
        spin = {"GOMP_SPINCOUNT": "300000"}
        t = timed(distill(out, "ua", spin), distill(out, "ub", spin))
        print(f"unmitigated pair (GOMP_SPINCOUNT=300000 in both): {t:.1f} s = {t / statistics.median(solo):.2f}x the "
              "median solo")


if __name__ == "__main__":
    main()
