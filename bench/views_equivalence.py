"""Teacher cache + student view (this checkout) against the pairwise version-5 cache of an older checkout: column for
column, then stage 2 from each (loss curve, final weights, projectors). The older checkout runs from a git worktree
of `--old-ref` (default 2f5e784, the last version-5 commit) in its own processes, over the same config and overrides.

usage: python bench/views_equivalence.py --cache-config configs/gemma3-270m_to_smollm2-135m/teacher_cache.yaml \\
         --distill-config configs/gemma3-270m_to_smollm2-135m/distill.yaml --rows 24 --set data.also=[] \\
         [--onpolicy-data <a rollout directory>]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from common import ROOT, SHARED
from safetensors.torch import load_file

TEACHER_COLUMNS = ["id", "teacher_ids", "teacher_response_start", "hidden", "topk_ids", "topk_logits", "lse",
                   "target_logprob"]
STUDENT_COLUMNS = ["id", "student_ids", "student_response_start", "align_student", "align_teacher", "align_label",
                   "align_ratio", "chunks"]
TRAIN = ["train.steps=2", "train.micro_batch_size=4", "train.grad_accum=2", "train.log_every=1", "checkpoint.every=0",
         "valid.every=0", "checkpoint.keep_best=0", "train.warmup_steps=0", "run_name=eq"]


def _in(tree: Path, code: str) -> str:
    """Run `code` with `tree` first on the path (its own process); the last line it prints that starts with OUT."""
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); {code}"], cwd=tree,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{tree}: {r.stderr[-3000:]}")
    return [line for line in r.stdout.splitlines() if line.startswith("OUT ")][-1][4:]


def build(tree: Path, config: Path, sets: list[str]) -> Path:
    return Path(_in(tree, "from pipeline.config import load_config, TeacherCacheConfig; from stages import teacher_cache;"
                          f"print('OUT', teacher_cache.run(load_config(TeacherCacheConfig, {str(config)!r}, {sets!r})))"))


def train(tree: Path, config: Path, sets: list[str]) -> Path:
    return Path(_in(tree, "from pipeline.config import load_config, DistillConfig; from stages import distill;"
                          f"print('OUT', distill.run(load_config(DistillConfig, {str(config)!r}, {sets!r})))"))


def _table(path: Path) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def compare_caches(old: Path, new: Path) -> str:
    views = [d for d in (new / "views").iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(views) != 1:
        raise SystemExit(f"{new}: {len(views)} views, expected the one of the config's student tokenizer")
    shards = json.loads((old / "manifest.json").read_text())["shards"]
    rows = 0
    for s in shards:
        o, t, v = _table(old / s["file"]), _table(new / s["file"]), _table(views[0] / s["file"])
        for cols, other, side in ((TEACHER_COLUMNS, t, "teacher"), (STUDENT_COLUMNS, v, "view")):
            for c in cols:
                if not o[c].equals(other[c]):
                    raise SystemExit(f"DIFFERENT: {s['file']} column {c} ({side})")
        rows += o.num_rows
    if not (np.load(old / "vocab_map.npy") == np.load(views[0] / "vocab_map.npy")).all():
        raise SystemExit("DIFFERENT: vocab_map.npy")
    return f"{rows} rows in {len(shards)} shards: every teacher column and every student column identical, vocab_map too"


def compare_runs(a: Path, b: Path) -> str:
    la = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    if [r["loss"] for r in la] != [r["loss"] for r in lb]:
        raise SystemExit(f"DIFFERENT losses: {[r['loss'] for r in la]} vs {[r['loss'] for r in lb]}")
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    for f in files:
        x, y = load_file(str(a / f)), load_file(str(b / f))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            raise SystemExit(f"DIFFERENT weights: {f}")
    return f"{len(la)} steps, losses {[round(r['loss'], 6) for r in la]}, {len(files)} weight files bit-identical"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-config", required=True)
    ap.add_argument("--distill-config", required=True)
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--set", action="append", default=[], help="overrides of the cache config (both checkouts)")
    ap.add_argument("--distill-set", action="append", default=[], help="overrides of the distill config")
    ap.add_argument("--onpolicy-data", default=None, help="also a cache of these generated rows as onpolicy.cache")
    ap.add_argument("--old-ref", default="2f5e784")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="views-eq-"))
    old_tree = out / "old-tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.old_ref], check=True,
                   capture_output=True)
    (out / "shared").symlink_to(SHARED)  # the configs' ../shared, from the worktree's parent
    try:
        trees = {"old": old_tree, "new": ROOT}
        sets = [f"data.limit={args.rows}", "cache.rows_per_shard=8", *args.set]
        caches = {k: build(t, ROOT / args.cache_config, [*sets, f"out_dir={out / k / 'cache'}"]) for k, t in trees.items()}
        print(f"cache: {compare_caches(caches['old'], caches['new'])}")
        onpolicy = {}
        if args.onpolicy_data:
            onpolicy = {k: build(t, ROOT / args.cache_config, [*sets, f"data.path={args.onpolicy_data}",
                                                                f"out_dir={out / k / 'onpolicy'}"]) for k, t in trees.items()}
            print(f"on-policy cache: {compare_caches(onpolicy['old'], onpolicy['new'])}")
        runs = {k: train(t, ROOT / args.distill_config, [*TRAIN, *args.distill_set, f"cache={caches[k]}",
                                                          f"out_dir={out / k / 'students'}",
                                                          *([f"onpolicy.cache={onpolicy[k]}", "onpolicy.mix=0.5"]
                                                            if onpolicy else [])])
                for k, t in trees.items()}
        print(f"stage 2{' with the on-policy cache' if onpolicy else ''}: {compare_runs(runs['old'], runs['new'])}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], capture_output=True)


if __name__ == "__main__":
    main()
