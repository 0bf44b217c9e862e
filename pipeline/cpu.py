"""What selects the CPU kernels, pinned before torch starts, so that a run reproduces bit for bit on another machine.

On a CPU the same code gives different last bits on different machines: torch's vectorised kernels follow the CPU's
instruction set (ATen picks AVX-512 where the CPU has it, else AVX2), MKL's matrix products pick their own code path
by CPU, and both split reductions by thread count. On the tiny default those bits grow over 300 steps into other
sampled answers (a clone on an AVX-512 EPYC gave 85.50 exact match where the README, from another machine, said
85.67). `DSKD_CPU_ISA` (`avx2` or `avx512`) sets all three libraries' choice of instruction set and `DSKD_CPU_THREADS`
the thread count; `make` sets them for the built-in default (configs/tiny: avx2 and 2 threads), so any x86-64 CPU with
AVX2 runs the same kernels with the same splits. Empty or unset: the libraries choose, as usual (real models keep the
fastest kernels). The variables are read when the `dskd` command starts, before torch is imported, and override what
the environment says (a user's own ATEN_CPU_CAPABILITY, MKL_CBWR, ONEDNN_MAX_CPU_ISA, OMP_NUM_THREADS,
MKL_NUM_THREADS); child processes (stage processes of on-policy rounds, data-loader workers) inherit them.
"""

from __future__ import annotations

import os

# instruction set -> (ATen's capability, MKL's conditional numerical reproducibility branch, oneDNN's ISA cap)
ISA = {
    "avx2": ("avx2", "AVX2", "AVX2"),
    "avx512": ("avx512", "AVX512", "AVX512_CORE"),
}


class CpuPinError(ValueError):
    """DSKD_CPU_ISA / DSKD_CPU_THREADS hold something this module does not know."""


def pin(environ=None) -> dict[str, str]:
    """Apply DSKD_CPU_ISA and DSKD_CPU_THREADS to the library variables of `environ` (os.environ by default); returns
    what was set. Must run before torch is imported to take effect."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    isa = env.get("DSKD_CPU_ISA", "").strip().lower()
    if isa:
        if isa not in ISA:
            raise CpuPinError(f"DSKD_CPU_ISA={isa!r}: expected one of {sorted(ISA)} (or empty: the libraries choose)")
        aten, mkl, onednn = ISA[isa]
        out.update(ATEN_CPU_CAPABILITY=aten, MKL_CBWR=mkl, ONEDNN_MAX_CPU_ISA=onednn)
    threads = env.get("DSKD_CPU_THREADS", "").strip()
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise CpuPinError(f"DSKD_CPU_THREADS={threads!r}: expected a positive integer (or empty)")
        out.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env.update(out)
    return out
