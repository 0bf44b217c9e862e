"""Stage `eval`: generate responses for the test split with a trained student; Rouge-L and exact match.

Writes <out_dir>/predictions.jsonl, results.json and the resolved config; prints a short table.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import EvalConfig, ModelRef, dump_config
from pipeline.data import load_examples
from pipeline.io_utils import write_json
from pipeline.metrics import score
from pipeline.models import load_tokenizer
from pipeline.rollout import open_generator
from pipeline.tokenize import Truncation, encode_prompt


def run(cfg: EvalConfig) -> Path:
    run_dir = Path(cfg.run)
    model_dir = run_dir / "final" if (run_dir / "final").is_dir() else run_dir
    out = Path(cfg.out_dir) if cfg.out_dir else run_dir / "eval"
    ref = ModelRef(path=str(model_dir))
    examples = load_examples(cfg.data)  # data errors before the model loads
    tokenizer = load_tokenizer(ref)
    cut = Truncation()
    prompts = [encode_prompt(tokenizer, e.prompt, cfg.tokenize, cut, e.id) for e in examples]
    if msg := cut.message(cfg.tokenize, f"eval ({cfg.data.path})"):
        print(msg)
    references = [[e.response] for e in examples]

    per_seed, predictions = {}, []
    max_len = cfg.tokenize.max_prompt_length + cfg.generate.max_new_tokens
    with open_generator(ref, tokenizer, cfg.generate, max_model_len=max_len) as gen:
        for seed in cfg.generate.seeds:
            preds = [c[0].text.strip() for c in gen.generate(prompts, cfg.generate, seed, progress=True,
                                                             keys=[e.id for e in examples])]
            per_seed[seed] = score(preds, references)
            predictions += [{"seed": seed, "id": e.id, "prediction": p, "reference": e.response}
                            for e, p in zip(examples, preds)]
    mean = {k: sum(s[k] for s in per_seed.values()) / len(per_seed) for k in ("rougeL", "exact_match")}
    results = {"model": str(model_dir), "data": cfg.data.path, "n": len(examples), **mean,
               "per_seed": {str(k): v for k, v in per_seed.items()}}

    from pipeline.data import write_jsonl

    write_jsonl(out / "predictions.jsonl", predictions)
    write_json(out / "results.json", results)
    dump_config(cfg, out / "config.yaml")
    name = run_dir.resolve().name  # the run's name, never cut
    width = max(len(name), len("run"))
    print(f"\n{'run':<{width}} {'n':>5} {'Rouge-L':>8} {'EM':>7}")
    print(f"{name:<{width}} {len(examples):>5} {mean['rougeL']:>8.2f} {mean['exact_match']:>7.2f}")
    print(f"model: {model_dir}\nresults: {out / 'results.json'}")
    return out
