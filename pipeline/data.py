"""Records -> `Example(id, prompt, response)`.

Reads a jsonl file (one JSON object per line) or a Hugging Face dataset by name. Which fields hold the prompt and
the response is explicit in the config (`prompt_field`, `response_field`); nothing is guessed from folder names.
Bad input raises `DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig


class DataError(ValueError):
    """A record is malformed; the message names file, line and field."""


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    response: str


def _example(rec: object, where: str, cfg: DataConfig, default_id: str) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    values = {}
    for name in (cfg.prompt_field, cfg.response_field):
        if name not in rec:
            raise DataError(f"{where}: missing field '{name}'")
        value = rec[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")
        values[name] = value
    if cfg.id_field is not None:
        if rec.get(cfg.id_field) in (None, ""):
            raise DataError(f"{where}: missing field '{cfg.id_field}'")
        row_id = str(rec[cfg.id_field])
    else:
        row_id = default_id
    return Example(row_id, values[cfg.prompt_field], values[cfg.response_field])


def read_jsonl(path: Path, cfg: DataConfig) -> list[Example]:
    examples: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if cfg.limit is not None and len(examples) >= cfg.limit:
                break
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            examples.append(_example(rec, where, cfg, default_id=f"{path.stem}:{lineno}"))
    return examples


def load_examples(cfg: DataConfig) -> list[Example]:
    """All examples of `cfg` in file order. Ids must be unique."""
    path = Path(cfg.path)
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        examples = read_jsonl(path, cfg)
    else:  # a Hugging Face dataset name (needs a hub or a local datasets cache)
        import datasets

        ds = datasets.load_dataset(cfg.path, split=cfg.split)
        if cfg.limit is not None:
            ds = ds.select(range(min(cfg.limit, len(ds))))
        examples = [
            _example(rec, f"{cfg.path}[{cfg.split}] row {i}", cfg, default_id=f"{cfg.split}:{i}")
            for i, rec in enumerate(ds)
        ]
    if not examples:
        raise DataError(f"{cfg.path}: no examples")
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.id in seen:
            raise DataError(f"{cfg.path}: duplicate id {ex.id!r} (rows {seen[ex.id]} and {i})")
        seen[ex.id] = i
    return examples


def write_jsonl(path: Path, records: list[dict]) -> Path:
    from pipeline.io_utils import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
