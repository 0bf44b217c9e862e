"""Evaluation: test suites by name, the DSKD papers' protocol as a preset, results kept per (checkpoint, suite, preset,
seed), teacher-forced NLL of the references, response lengths.

Where results live (one directory per evaluated model, `<run>/eval` for a run):

    <eval_dir>/<checkpoint16>/<suite>-<suite8>/<preset>-<preset8>/seed-<seed>.json   scores, lengths, predictions
    <eval_dir>/<checkpoint16>/<suite>-<suite8>/nll-<nll8>.json                        NLL / perplexity of references
    <eval_dir>/results-<preset>.json                                                  the summary `dskd report` reads

`checkpoint16` is a content hash of the weights (pipeline.models.load.model_fingerprint), `suite8` of the suite's
definition and its data file, `preset8` of everything in the preset that changes an answer (decoding, prompt length,
row cap; not the seeds, each its own file, nor the backend or batch size). Each file is written whole under a
temporary name, so an interrupted eval resumes at the first pair without a file, and a retrained checkpoint gets new
files beside the old ones.
"""

from __future__ import annotations

import glob
import json
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.config import (
    ConfigError,
    EvalConfig,
    EvalPreset,
    GenerateConfig,
    ModelRef,
    SuiteConfig,
    config_identity,
)
from pipeline.data.records import DataError, jsonl_records
from pipeline.data.tokenize import pad, special_ids
from pipeline.evaluate.metrics import HEADLINE, gsm8k_reference
from pipeline.io_utils import hash_json, sha256_file, write_json
from pipeline.models.head import OutputHead
from pipeline.models.load import checkpoint_dir, decoder_hidden, model_fingerprint
from pipeline.models.lora import base_ref, is_adapter_dir

# MiniLLM / DSKD's Alpaca-style prompt, for suites that hold only an instruction (GSM8K's question)
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{}\n\n### Response:\n")

BUILTIN_SUITES: dict[str, SuiteConfig] = {
    "dolly": SuiteConfig(path="{data_root}/minillm_eval/dolly/valid.jsonl"),
    "self-inst": SuiteConfig(path="{data_root}/minillm_eval/self-inst/valid.jsonl"),
    "vicuna": SuiteConfig(path="{data_root}/minillm_eval/vicuna/valid.jsonl"),
    # S-NI, responses of at least 11 tokens; several references per row
    "sinst": SuiteConfig(path="{data_root}/minillm_eval/sinst/11_/valid.jsonl"),
    "gsm8k": SuiteConfig(path="{data_root}/gsm8k/test.jsonl", metric="gsm8k", prompt_field=None,
                         prompt_template=ALPACA.format("{question}"), reference_field="answer"),
}
# (`minillm_eval/uinst_partial_short` is not DSKD's UnNI test set, see shared/data/README: it is not built in)

PROTOCOL = EvalPreset(
    generate=GenerateConfig(max_new_tokens=256, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                            no_repeat_ngram_size=6, seeds=[10, 20, 30, 40, 50]),
    max_prompt_length=256,
)
BUILTIN_PRESETS: dict[str, EvalPreset] = {
    # the DSKD papers' decoding (reference section 11): sampling at T=1, no top-p/top-k, no 6-gram repeats
    "protocol": PROTOCOL,
    # development: greedy, one seed, the first 50 rows of each suite
    "quick": replace(PROTOCOL, generate=replace(PROTOCOL.generate, do_sample=False, seeds=[10]), limit=50),
}
# the protocol's stop string (cut after decoding, as the reference's post-processing does)
STOP_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class EvalRow:
    id: str
    prompt: str
    references: tuple[str, ...]


@dataclass(frozen=True)
class Suite:
    name: str
    cfg: SuiteConfig
    rows: list[EvalRow]
    key: str  # "<name>-<hash of definition and data>"

    @property
    def metric(self) -> str:
        return self.cfg.metric


def _lookup(kind: str, name: str, own: dict, builtin: dict, section: str):
    """The config's own definition first, then the built-in one."""
    if name in own:
        return own[name]
    if name in builtin:
        return builtin[name]
    raise ConfigError(f"eval: unknown {kind} {name!r} (built in: {', '.join(builtin)}; or define it under {section})")


def lookup_suite(cfg: EvalConfig, name: str) -> SuiteConfig:
    return _lookup("suite", name, cfg.suite_defs, BUILTIN_SUITES, "suite_defs")


def lookup_preset(cfg: EvalConfig, name: str) -> EvalPreset:
    return _lookup("preset", name, cfg.presets, BUILTIN_PRESETS, "presets")


def preset_key(name: str, preset: EvalPreset) -> str:
    """What in a preset changes an answer (not the seeds, backend, batch size or engine memory)."""
    gen = {k: v for k, v in config_identity(preset.generate).items()
           if k not in ("seeds", "batch_size", "backend", "gpu_memory_utilization")}
    what = {"generate": gen, "max_prompt_length": preset.max_prompt_length, "limit": preset.limit}
    return f"{name}-{hash_json(what)[:8]}"


def _references(value, where: str, field: str) -> tuple[str, ...]:
    refs = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else None
    if not refs or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{where}: field '{field}' must be a string or a non-empty list of strings")
    return refs


def _row(rec: object, where: str, s: SuiteConfig, default_id: str) -> EvalRow:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if s.prompt_template is not None:
        try:
            prompt = s.prompt_template.format(**rec)
        except KeyError as e:
            raise DataError(f"{where}: missing field {e} (used by the suite's prompt_template)") from None
    else:
        prompt = rec.get(s.prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: field '{s.prompt_field}' must be a non-empty string")
    if s.reference_field not in rec:
        raise DataError(f"{where}: missing field '{s.reference_field}'")
    refs = _references(rec[s.reference_field], where, s.reference_field)
    if s.metric == "gsm8k":

        for r in refs:
            try:
                gsm8k_reference(r)
            except ValueError as e:
                raise DataError(f"{where}: field '{s.reference_field}': {e}") from None
    row_id = default_id
    if s.id_field is not None:
        if rec.get(s.id_field) in (None, ""):
            raise DataError(f"{where}: missing field '{s.id_field}'")
        row_id = str(rec[s.id_field])
    return EvalRow(row_id, prompt, refs)


def load_suite(name: str, s: SuiteConfig, data_root: str, limit: int | None) -> Suite:
    """The first `limit` rows of a suite (all when None); errors name the file, line and field."""
    path_text = s.path.replace("{data_root}", data_root)
    path = Path(path_text)
    rows: list[EvalRow] = []
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.is_file():
            hint = " (set data_root to the folder that holds minillm_eval/ and gsm8k/)" if "{data_root}" in s.path else ""
            raise DataError(f"suite {name}: {path}: data file not found{hint}")
        rows = [_row(rec, where, s, row_id) for rec, where, row_id in jsonl_records(path, limit)]
        data_id = sha256_file(path)
    else:  # a Hugging Face dataset name
        import datasets

        ds = datasets.load_dataset(path_text, s.hub_config, split=s.split)
        for i, rec in enumerate(ds.select(range(min(limit or len(ds), len(ds))))):
            rows.append(_row(rec, f"{path_text}[{s.split}] row {i}", s, f"{s.split}:{i}"))
        data_id = f"{path_text}:{s.hub_config}:{s.split}:{getattr(ds, '_fingerprint', '')}"
    if not rows:
        raise DataError(f"suite {name}: {path_text}: no rows")
    seen: set[str] = set()
    for r in rows:
        if r.id in seen:
            raise DataError(f"suite {name}: duplicate row id {r.id!r}")
        seen.add(r.id)
    what = {"suite": config_identity(s), "data": data_id, "limit": limit}
    return Suite(name, s, rows, f"{name}-{hash_json(what)[:8]}")


# --------------------------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class RunDir:
    """A run as eval and report see it: its name in tables, the model to evaluate, where results go and where its
    training curves are."""

    name: str
    ref: ModelRef
    eval_dir: Path
    metrics: tuple[Path, ...]  # metrics.jsonl files in step order (an on-policy run: one per round)


def split_entry(entry: str) -> tuple[str, str]:
    """`NAME=PATH` -> (NAME, PATH); a bare PATH -> ("", PATH)."""
    name, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
    return name, path


def expand_runs(entries: list[str], stage: str) -> list[str]:
    """`[NAME=]PATH` entries with glob patterns expanded (sorted, directories only); the same for eval, report and
    analyze, so that one RUNS works with each."""
    out = []
    for e in entries:
        name, path = split_entry(e)
        matches = sorted(p for p in glob.glob(path) if Path(p).is_dir()) if glob.has_magic(path) else [path]
        if not matches:
            raise ConfigError(f"{stage}: {path!r} matches no run directory")
        out += [f"{name}={m}" if name else m for m in matches]
    return out


def resolve_run(entry: str) -> RunDir:
    """`[NAME=]PATH`: a student run (final/ inside), an on-policy run (result.json names its last student; curves of
    every round), a model directory, or the results directory of a model an eval config names in `models`
    (<out_dir>/<name>: reports read it as it is). NAME defaults to the directory's name."""
    name, path = split_entry(entry)
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"eval: {p}: no such run or model directory")
    name = name or p.resolve().name
    if (p / "result.json").is_file() and any(p.glob("round-*")):  # stages/onpolicy.py
        student = Path(json.loads((p / "result.json").read_text())["student"])
        rounds = sorted(p.glob("round-*/*/metrics.jsonl"))
        return RunDir(name, ModelRef(path=str(student)), p / "eval", tuple(rounds))
    if not (p / "final").is_dir() and not (p / "config.json").is_file() and any(p.glob("results-*.json")):
        # the results of a model named in an eval config's `models` (<out_dir>/<name>): its own eval directory
        return RunDir(name, ModelRef(path=str(p)), p, ())
    model = p / "final" if (p / "final").is_dir() else p
    return RunDir(name, ModelRef(path=str(model)), p / "eval", (p / "metrics.jsonl",))


# --------------------------------------------------------------------------------------------------------------
# What is stored


def checkpoint_hash(ref: ModelRef) -> str:
    """16 hex digits of the weights' content hash (a retrained checkpoint gets a new one)."""

    return hash_json(model_fingerprint(ref))[:16]


def pair_path(eval_dir: Path, ckpt: str, suite_key: str, preset_key_: str, seed: int) -> Path:
    return eval_dir / ckpt / suite_key / preset_key_ / f"seed-{seed}.json"


def nll_path(eval_dir: Path, ckpt: str, suite_key: str, preset: EvalPreset) -> Path:
    what = {"max_prompt_length": preset.max_prompt_length, "max_new_tokens": preset.generate.max_new_tokens,
            "limit": preset.limit}
    return eval_dir / ckpt / suite_key / f"nll-{hash_json(what)[:8]}.json"


def read_result(path: Path) -> dict | None:
    """A stored result, or None when it is missing or unreadable (an unreadable one is recomputed)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def postprocess(text: str) -> str:
    """The protocol's post-processing: cut at the first stop string, strip."""
    return text.split(STOP_TEXT, 1)[0].strip()


def length_stats(completions) -> dict:
    """Generated tokens per answer (EOS not counted) and the share that stopped at EOS."""
    n = [len(c.token_ids) - (c.finish_reason == "stop") for c in completions]
    return {"mean_tokens": statistics.fmean(n), "median_tokens": statistics.median(n), "max_tokens": max(n),
            "stopped_at_eos": 100 * sum(c.finish_reason == "stop" for c in completions) / len(n)}


def encode_left(tokenizer, prompt: str, max_prompt_length: int) -> list[int]:
    """Prompt ids keeping the last `max_prompt_length` tokens (the protocol's left truncation)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return ids[-max_prompt_length:]


def max_positions(ref: ModelRef) -> int | None:
    """The model's position limit (max_position_embeddings), None when its config has none."""
    from transformers import AutoConfig


    path = checkpoint_dir(ref)
    if is_adapter_dir(path):
        path = checkpoint_dir(base_ref(Path(path)))
    cfg = AutoConfig.from_pretrained(path)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "max_position_embeddings", None)


@torch.no_grad()
def reference_nll(model, tokenizer, prompts: list[list[int]], rows: list[EvalRow], max_new_tokens: int,
                  batch_size: int = 8) -> dict:
    """Teacher-forced NLL of each row's first reference (cut to `max_new_tokens` tokens, then EOS) after its prompt:
    mean per token over the suite, its perplexity, and the number of tokens. The head runs at the reference's
    positions only (a 262k vocabulary over whole padded batches would be GBs of logits)."""

    eos, pad_id = special_ids(tokenizer)
    head = OutputHead.from_model(model)
    seqs = []
    for p, r in zip(prompts, rows):
        resp = tokenizer.encode(r.references[0], add_special_tokens=False)[:max_new_tokens]
        seqs.append((p, resp + ([eos] if eos is not None else [])))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad([seqs[i][0] + seqs[i][1] for i in idx], pad_id, side="right")
        hidden = decoder_hidden(model, ids.to(device), mask.to(device))
        for b, i in enumerate(idx):
            p, resp = seqs[i]
            z = head.logits(hidden[b, len(p) - 1 : len(p) + len(resp) - 1])  # the positions that predict resp
            total += float(torch.nn.functional.cross_entropy(z, torch.tensor(resp, device=z.device), reduction="sum"))
            count += len(resp)
    mean = total / max(count, 1)
    return {"nll": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": count}


# --------------------------------------------------------------------------------------------------------------
# Summaries


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(per_suite: dict[str, dict]) -> dict:
    """Per suite the headline score's mean and std over seeds, and the average over the Rouge-L suites (computed per
    seed, then mean and std over the seeds that every such suite has)."""
    out = {}
    for name, s in per_suite.items():
        key = HEADLINE[s["metric"]]
        seeds = s["seeds"]
        out[name] = {"metric": key, **mean_std([seeds[k]["scores"][key] for k in sorted(seeds, key=int)])}
    rouge = [n for n, s in per_suite.items() if s["metric"] == "rougeL"]
    if rouge:
        common = set.intersection(*(set(per_suite[n]["seeds"]) for n in rouge))
        if common:
            avgs = [statistics.fmean(per_suite[n]["seeds"][k]["scores"]["rougeL"] for n in rouge)
                    for k in sorted(common, key=int)]
            out["average"] = {"metric": "rougeL", "suites": rouge, **mean_std(avgs)}
    return out


def write_summary(eval_dir: Path, preset_name: str, summary: dict) -> Path:
    return write_json(eval_dir / f"results-{preset_name}.json", summary)
