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

import ctypes
import ctypes.util
import os
import sys
import tempfile
from pathlib import Path

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


# --------------------------------------------------------------------------------------------------------------
# Threads, and the other dskd jobs sharing the machine


def allowed_cores() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cgroup cpusets), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_threads(environ=None) -> tuple[int, str]:
    """The intra-op thread count and why: DSKD_CPU_THREADS (the pin), else OMP_NUM_THREADS (torchrun sets 1 per
    rank), else the cores this process may use. Written to OMP_NUM_THREADS / MKL_NUM_THREADS before torch starts,
    so that torch, MKL and oneDNN take it (and so do child processes)."""
    env = os.environ if environ is None else environ
    if (pinned := env.get("DSKD_CPU_THREADS", "").strip()):
        n, why = int(pinned), "DSKD_CPU_THREADS, pinned for reproducibility"
    elif (omp := env.get("OMP_NUM_THREADS", "").strip()).isdigit() and int(omp) > 0:
        n, why = int(omp), "OMP_NUM_THREADS"
    else:
        n, why = allowed_cores(), "the cores this process may use"
    env.update(OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
    return n, why


# libgomp (torch's OpenMP) spins this long in a barrier before it sleeps; the library's default (300000) keeps a core
# busy for a thread that is waiting for a sibling another process has descheduled: two 2-thread jobs on 2 cores then
# ran a step 25x slower. Set only when another dskd job is running as this one starts (a job alone keeps the default
# and its speed), and never over the user's own OMP_WAIT_POLICY / GOMP_SPINCOUNT.
SHARED_SPINCOUNT = "1000"


def jobs_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"dskd-jobs-{os.getuid()}"


_JOB_FD: int | None = None


def register_job(stage: str) -> list[str]:
    """Say that this process computes (held until it exits: an flock on <jobs_dir>/<pid>, taken before the others
    are counted, so of two jobs starting together the later sees the earlier); returns the other live jobs, as
    'stage (pid N)'. Files of jobs that ended are removed."""
    global _JOB_FD
    import fcntl

    d = jobs_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        if _JOB_FD is None:  # locked under a name the others skip, then renamed: never seen unlocked
            tmp = d / f".{os.getpid()}"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, stage.encode())
            os.replace(tmp, d / str(os.getpid()))
            _JOB_FD = fd
        others = []
        for f in sorted(d.iterdir()):
            if f.name == str(os.getpid()) or f.name.startswith("."):
                continue
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:  # held: a live job
                others.append(f"{os.pread(fd, 200, 0).decode(errors='replace').strip() or 'a job'} (pid {f.name})")
            else:
                f.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return others
    except OSError:  # a read-only temporary directory: no registry, nothing else changes
        return []


def end_job() -> None:
    """This process no longer computes (a command run inside a longer-lived process, e.g. a test's CliRunner)."""
    global _JOB_FD
    if _JOB_FD is not None:
        fd, _JOB_FD = _JOB_FD, None
        (jobs_dir() / str(os.getpid())).unlink(missing_ok=True)
        os.close(fd)


def configure(stage: str, environ=None) -> str:
    """Before torch starts, for a stage that computes: the pin, the thread count, this job in the registry and, when
    other jobs share the machine, a short spin-wait. Returns the line the stage prints first."""
    env = os.environ if environ is None else environ
    pin(env)
    malloc_setting(env)  # a wrong value is refused before anything loads
    n, why = choose_threads(env)
    others = register_job(stage)
    line = f"{stage}: {n} compute thread(s) ({why}; {allowed_cores()} core(s) allowed)"
    if others:
        if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
            env["GOMP_SPINCOUNT"] = SHARED_SPINCOUNT
        line += (f"; sharing the machine with {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}: "
                 f"each job is slower (README: two jobs on one machine)")
    return line


MALLOC_SETTINGS = ("keep", "default")


def malloc_setting(environ=None) -> str:
    """DSKD_CPU_MALLOC: `keep` (unset or empty) or `default` (see `keep_freed_memory`)."""
    env = os.environ if environ is None else environ
    setting = env.get("DSKD_CPU_MALLOC", "") or "keep"
    if setting not in MALLOC_SETTINGS:
        raise CpuPinError(f"DSKD_CPU_MALLOC={setting!r}: expected one of {', '.join(MALLOC_SETTINGS)} (or unset: keep)")
    return setting


def keep_freed_memory(environ=None) -> bool:
    """On Linux/glibc, keep freed CPU memory in the heap for reuse instead of returning it to the kernel, unless
    `DSKD_CPU_MALLOC=default` (glibc's own behaviour) asks otherwise.

    Training on a CPU allocates and frees tensors of hundreds of MB (a chunk of vocabulary-sized logits) many times
    per step; by default each comes from a fresh mmap whose pages the kernel must zero on first touch. Raising the
    mmap and trim thresholds makes glibc reuse them: measured on 2 cores at V = 49,152, a kd step 3.1 s -> 1.9 s,
    dskd_v2 10.3 s -> 5.8 s. The price is resident memory: freed blocks stay resident, and tensors of varying sizes
    leave gaps the heap cannot reuse. At V = 262,144 (`python bench/step_memory.py`: dskd_eta, micro-batch 8, 2
    cores) the fused step's peak resident memory was 7175 MB against 6386 MB with glibc's default, for 7.8 s against
    10.0 s a step (3247 MB resting, 2236 MB of the step's own tensors at once: the allocator held 1692 MB beyond
    them, against 903). `DSKD_CPU_MALLOC=default` chooses the lower peak. Most of what glibc holds beyond the
    tensors comes from torch's 64-byte-aligned allocations, whose slivers glibc caches apart, so that a freed block
    cannot take the next tensor of its size; page alignment (torch's THP_MEM_ALLOC_ENABLE) and glibc without its
    per-thread cache both cure that and both cost more elsewhere (docs/results.md, "Why glibc holds that much").
    Process-wide. Returns False where it does not apply or is turned off."""
    if malloc_setting(environ) == "default":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # a trim threshold of -1 is SIZE_MAX inside glibc: the heap is never trimmed (2 GB, before, was exceeded at
        # the 262k vocabulary: its freed top went back to the kernel, and the next step faulted it in again)
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, -1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
