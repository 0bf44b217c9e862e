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


def _jsonl_lines(path: Path):
    """(line number, text) of the non-blank lines; bytes that are not UTF-8 are an error naming the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "re-encode the file as UTF-8") from None
            if line.strip():
                yield lineno, line


def read_jsonl(path: Path, cfg: DataConfig) -> list[tuple[Example, str]]:
    """(example, "file:line") in file order."""
    out: list[tuple[Example, str]] = []
    for lineno, line in _jsonl_lines(path):
        if cfg.limit is not None and len(out) >= cfg.limit:
            break
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        out.append((_example(rec, where, cfg, default_id=f"{path.stem}:{lineno}"), where))
    return out


def load_examples(cfg: DataConfig) -> list[Example]:
    """All examples of `cfg` in file order. Ids must be unique."""
    path = Path(cfg.path)
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise DataError(f"{path}: data file not found")
        rows = read_jsonl(path, cfg)
    else:  # a Hugging Face dataset name (needs a hub or a local datasets cache)
        import datasets

        ds = datasets.load_dataset(cfg.path, split=cfg.split)
        if cfg.limit is not None:
            ds = ds.select(range(min(cfg.limit, len(ds))))
        rows = []
        for i, rec in enumerate(ds):
            where = f"{cfg.path}[{cfg.split}] row {i}"
            rows.append((_example(rec, where, cfg, default_id=f"{cfg.split}:{i}"), where))
    if not rows:
        raise DataError(f"{cfg.path}: no examples")
    seen: dict[str, str] = {}
    for ex, where in rows:
        if ex.id in seen:
            raise DataError(f"{where}: duplicate id {ex.id!r} (first at {seen[ex.id]})")
        seen[ex.id] = where
    return [ex for ex, _ in rows]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    from pipeline.io_utils import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
