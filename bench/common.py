"""What every benchmark script starts with: the project importable, the hub off, and where the shared data is."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED = Path(os.environ.get("DSKD_SHARED", ROOT.parent / "shared")).resolve()

# A ratio is a figure only when it held over rounds: at least MIN_ROUNDS interleaved rounds, and a min-max range
# within UNSTABLE of its median; otherwise it is printed as unstable (with its range), never as a number alone.
MIN_ROUNDS = 3
UNSTABLE = 0.10


def spread(values) -> dict:
    """Median, min, max and round count of one ratio measured once per round, and whether it is a figure."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("no rounds measured")
    mid = statistics.median(v)
    return {"median": mid, "min": v[0], "max": v[-1], "rounds": len(v),
            "stable": len(v) >= MIN_ROUNDS and v[-1] - v[0] <= UNSTABLE * abs(mid)}


def show(s: dict, unit: str = "x", digits: int = 2) -> str:
    """'1.04x (1.01-1.06)', or 'unstable (0.71-1.12x over 3 rounds)' / '... (1 round; 3 needed)'."""
    rng = f"{s['min']:.{digits}f}-{s['max']:.{digits}f}"
    if s["rounds"] < MIN_ROUNDS:
        return f"not a figure ({rng}{unit}, {s['rounds']} round{'s' * (s['rounds'] != 1)}; {MIN_ROUNDS} needed)"
    if not s["stable"]:
        return f"unstable ({rng}{unit} over {s['rounds']} rounds)"
    return f"{s['median']:.{digits}f}{unit} ({rng})"


def status_mb(field: str) -> float:
    """A field of /proc/self/status (kB: VmRSS, VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def malloc_trim() -> None:
    """glibc returns the free pages of its heaps to the kernel (the resident memory is then what is alive)."""
    ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
