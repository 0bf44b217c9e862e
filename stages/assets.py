"""Stage `assets`: build the built-in default from nothing (data splits, three tokenizers, tiny initial models).

Skipped when `<out_dir>/assets.json` records the same config: the outputs are deterministic functions of it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import lock
from pipeline.config import AssetsConfig, config_to_dict, dump_config
from pipeline.data.default_task import (
    build_tiny_model,
    corpus,
    train_bpe_tokenizer,
    train_metaspace_tokenizer,
    write_splits,
)
from pipeline.io_utils import hash_json, save_pretrained, write_json

STAMP = "assets.json"


def run(cfg: AssetsConfig) -> Path:
    out = Path(cfg.out_dir)
    fingerprint = hash_json(config_to_dict(cfg))
    stamp = out / STAMP

    def done() -> bool:  # the stamp is written last and whole: reading it needs no lock
        if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
            print(f"assets: up to date in {out} and {cfg.data_dir}")
            return True
        return False

    if done():
        return out
    with lock.writer(out, "assets"):  # one writer of the models (the data directory is written only from here)
        return out if done() else _build(cfg, out, fingerprint, stamp)


def _build(cfg: AssetsConfig, out: Path, fingerprint: str, stamp: Path) -> Path:

    data_dir = Path(cfg.data_dir)
    splits = write_splits(cfg.task, data_dir)
    texts = corpus([splits["train"]])
    tokenizers = {
        "bpe": train_bpe_tokenizer(texts, cfg.bpe_vocab_size),
        "metaspace": train_metaspace_tokenizer(texts, cfg.metaspace_vocab_size),
        "pieces": train_metaspace_tokenizer(texts, cfg.pieces_vocab_size),
    }
    for name, tok in tokenizers.items():
        tok.save_pretrained(out / f"tokenizer-{name}")
    for name, mcfg in cfg.models.items():
        tok = tokenizers[mcfg.tokenizer]
        model = build_tiny_model(mcfg, tok)
        save_pretrained(model, out / name)
        tok.save_pretrained(out / name)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"assets: {name}: {mcfg.architecture}, {n_params / 1e6:.2f}M parameters, {mcfg.tokenizer} tokenizer")
    dump_config(cfg, out / "config.yaml")
    # written last: its presence means every output above is complete
    write_json(stamp, {"fingerprint": fingerprint, "splits": {k: str(v) for k, v in splits.items()}})
    print(f"assets: data in {data_dir}, tokenizers and models in {out}")
    return out
