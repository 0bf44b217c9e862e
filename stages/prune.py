"""Stage `prune`: a layer-dropped student from any decoder model (hub name, directory or GGUF file).

Skipped when `<out_dir>/prune.json` records the same config and source weights. The model directory is written under
a temporary name and renamed into place, so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline import lock
from pipeline.config import PruneConfig, config_to_dict
from pipeline.io_utils import hash_json, save_pretrained, write_json
from pipeline.models.load import DTYPES, check_model_ref, load_model, load_tokenizer, model_fingerprint
from pipeline.models.prune import choose_layers, layer_count, prune

STAMP = "prune.json"


def run(cfg: PruneConfig) -> Path:
    out = Path(cfg.out_dir)
    check_model_ref(cfg.model)
    fingerprint = hash_json({"config": config_to_dict(cfg), "model": model_fingerprint(cfg.model)})
    stamp = out / STAMP

    def done() -> bool:  # the directory is renamed into place whole: reading its stamp needs no lock
        if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
            print(f"prune: up to date in {out}")
            return True
        return False

    if done():
        return out
    with lock.writer(out, "prune"):  # one writer: its temporary directory has a fixed name
        return out if done() else _build(cfg, out, fingerprint)


def _build(cfg: PruneConfig, out: Path, fingerprint: str) -> Path:
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, dtype="float32")
    n = layer_count(model.config)
    keep = choose_layers(n, cfg.num_layers, cfg.layers, cfg.strategy)
    student = prune(model, keep)
    del model
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(student.to(DTYPES[cfg.dtype]), tmp)
    tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in student.parameters())
    write_json(tmp / STAMP, {"fingerprint": fingerprint, "layers": keep, "of": n, "parameters": params})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"prune: kept layers {keep} of {n}: {params / 1e6:.1f}M parameters -> {out}")
    return out
