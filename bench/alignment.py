"""Exact token alignment on real tokenizers: aligned fraction of student tokens and throughput.

For each pair, the first 200 Dolly test examples (prompt + response as one text) are tokenized by both sides (not
timed), then `exact_token_alignment` runs on the offsets (timed). Ratio = aligned pairs / student tokens.

    python bench/alignment.py [--rows 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.alignment import exact_token_alignment  # noqa: E402
from tests.conftest import SHARED, shared_tokenizer  # noqa: E402

# (student, teacher) as named in the issue: GPT-2 <- Llama-2, GPT-2 <- Qwen2, Llama-2 <- Qwen2, Llama-3 <- Gemma-4
PAIRS = [("gpt-2", "llama-spm"), ("gpt-2", "qwen2"), ("llama-spm", "qwen2"), ("llama-bpe", "gemma-4")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200)
    args = ap.parse_args()
    lines = (SHARED / "data/minillm_eval/dolly/valid.jsonl").read_text().splitlines()[: args.rows]
    texts = [r["prompt"] + r["output"] for r in map(json.loads, lines)]
    offsets = {}
    for name in {n for pair in PAIRS for n in pair}:
        tok = shared_tokenizer(name)
        offsets[name] = [tok(t, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"] for t in texts]
    print(f"bench-alignment: first {len(texts)} Dolly test prompt+response texts")
    for student, teacher in PAIRS:
        aligned = tokens = 0
        t0 = time.perf_counter()
        for text, so, to in zip(texts, offsets[student], offsets[teacher]):
            aligned += len(exact_token_alignment(so, to, text))
            tokens += len(so)
        dt = time.perf_counter() - t0
        print(f"  {student:>9} <- {teacher:<9} aligned {aligned / tokens:.3f} of student tokens   "
              f"{len(texts) / dt:7.0f} sequence pairs/s")


if __name__ == "__main__":
    main()
