"""Stage `analyze`: the representation analysis of the DSKD paper for each run (pipeline/evaluate/analysis.py).

For `rows` training rows drawn (seeded) from the teacher cache, the structure-matrix distances between the cached
teacher hidden states and the student's, for the trained student and for the student it started from. Writes
<run>/analysis/representation.json and structure.png (one sequence's cosine matrices, teacher beside students).
For a run with a t2s projector (dskd, dskd_v2, dskd_eta, alm_eta), also the trained projected teacher's agreement
with its t2s labels by response position.
A result whose inputs (checkpoint hash, cache, rows, seed) are unchanged is not recomputed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cache.batch import collate_cache_rows
from pipeline.cache.store import CacheReader
from pipeline.config import ConfigError, DistillConfig, load_config
from pipeline.data.tokenize import special_ids
from pipeline.evaluate.analysis import (
    RESULT,
    analysis_dir,
    paired_positions,
    plot_structures,
    representation_distance,
    student_hidden,
    t2s_agreement_by_position,
)
from pipeline.evaluate.suites import checkpoint_hash, read_result, resolve_run
from pipeline.io_utils import write_json
from pipeline.models.load import load_model, load_tokenizer
from pipeline.objectives.projectors import PROJECTORS_FILE, Projectors
from pipeline.objectives.table import spec
from pipeline.train.sources import open_for_student

# bump when the result gains a field: older results are recomputed
VERSION = 2


def _agreement(model, cfg: DistillConfig, reader: CacheReader, proj_file: Path, sample: list, ref) -> dict[str, float]:
    """The trained projector's agreement with its t2s labels by response position (pipeline/evaluate/analysis.py)."""
    from safetensors.torch import load_file


    head = model.get_output_embeddings().weight
    proj = Projectors(cfg.loss.objective, head.shape[1], reader.manifest.hidden_size)
    proj.load_state_dict(load_file(str(proj_file)))
    pad = special_ids(load_tokenizer(ref))[1]
    batches = [collate_cache_rows(sample[i : i + 16], pad) for i in range(0, len(sample), 16)]
    return t2s_agreement_by_position(model, proj, cfg.loss.objective, batches)


def run(runs: list[str], rows: int = 32, seed: int = 0, cache: str | None = None) -> dict[str, dict]:
    out = {}
    for entry in runs:
        r = resolve_run(entry)
        cfg_path = r.metrics[0].parent / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"analyze {r.name}: {cfg_path} not found (not a student run of `dskd distill`)")
        cfg = load_config(DistillConfig, cfg_path)
        cache_path = cache or cfg.cache
        if cache_path is None:
            raise ConfigError(f"analyze {r.name}: an SFT run has no teacher cache; give one (`--cache DIR`, the "
                              "cache the other runs were distilled from)")
        tok_ref = cfg.student_tokenizer or cfg.student
        reader = open_for_student(cache_path, load_tokenizer(tok_ref), tok_ref)
        pick = sorted(np.random.default_rng(seed).choice(len(reader), min(rows, len(reader)), replace=False).tolist())
        key = {"checkpoint": checkpoint_hash(r.ref), "initial": checkpoint_hash(cfg.student),
               "cache": reader.fingerprint, "rows": pick, "version": VERSION}
        target = analysis_dir(entry) / RESULT
        old = read_result(target)
        if old is not None and old.get("key") == key:
            print(f"analyze {r.name}: up to date ({target})")
            out[r.name] = old
            continue
        sample = [reader[i] for i in pick]
        proj_file = Path(r.ref.path).parent / PROJECTORS_FILE
        shown = next((x for x in sample if len(paired_positions(x)[0]) >= 4), sample[0])
        s_idx, t_idx = paired_positions(shown)
        result, hidden = {"name": r.name, "key": key, "cache": str(reader.dir)}, {}
        for label, ref in (("trained", r.ref), ("initial", cfg.student)):
            model = load_model(ref)
            d = representation_distance(model, sample)
            result[label] = {k: d[k] for k in ("cosine_l1", "inner_l1")}
            result["rows"], result["positions"] = d["rows"], d["positions"]
            hidden[f"{label} student"] = student_hidden(model, shown)[s_idx]
            if label == "trained" and spec(cfg.loss.objective).t2s_labels is not None and proj_file.is_file():
                result["t2s_agreement_by_position"] = _agreement(model, cfg, reader, proj_file, sample, r.ref)
            del model
        target.parent.mkdir(parents=True, exist_ok=True)
        plot_structures(shown.hidden.float()[t_idx], hidden, analysis_dir(entry) / "structure.png",
                        f"{r.name}: cosine structure of one response ({shown.id})")
        write_json(target, result)
        t, i = result["trained"], result["initial"]
        print(f"analyze {r.name}: L1 cosine {t['cosine_l1']:.4f} (initial {i['cosine_l1']:.4f}), L1 inner product "
              f"{t['inner_l1']:.4f} (initial {i['inner_l1']:.4f}) over {result['rows']} rows -> {target}")
        if a := result.get("t2s_agreement_by_position"):
            print(f"analyze {r.name}: t2s agreement by response position: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in a.items()))
        out[r.name] = result
    return out
