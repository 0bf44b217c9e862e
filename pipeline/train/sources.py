"""What stage 2 trains on, read by row index: a teacher cache (the teacher side included) or tokenized examples
(plain SFT)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.cache.batch import Batch, collate_cache_rows, collate_examples
from pipeline.cache.schema import DATA_FILE
from pipeline.cache.store import CacheReader
from pipeline.config import ConfigError, DataConfig
from pipeline.data.records import Example, load_examples
from pipeline.data.tokenize import Truncation, encode
from pipeline.io_utils import hash_json


@dataclass
class Source:
    lengths: np.ndarray  # (rows,) student sequence lengths
    collate: Callable[[list[int]], Batch]
    fingerprint: str
    examples: Callable[[list[int]], list[Example]]  # prompt / response of rows (validation generation)

    def __len__(self) -> int:
        return len(self.lengths)


def cache_source(reader: CacheReader, pad_id: int, limit: int | None = None) -> Source:
    n = len(reader) if limit is None else min(limit, len(reader))
    by_id: dict[str, Example] = {}

    def examples(idx: list[int]) -> list[Example]:  # the cache's own copy of its data, read on first use
        if not by_id:
            by_id.update((e.id, e) for e in load_examples(DataConfig(path=str(reader.dir / DATA_FILE), id_field="id")))
        return [by_id[reader[i].id] for i in idx]

    return Source(reader.lengths()[:n], lambda idx: collate_cache_rows([reader[i] for i in idx], pad_id),
                  reader.manifest.fingerprint, examples)


def data_source(examples: list[Example], tokenizer, tok_cfg, pad_id: int, where: str = "") -> Source:
    """Tokenized examples (plain SFT); truncation reported once under `where` (empty: not reported)."""
    cut = Truncation()
    encoded = []
    for e in examples:
        enc = encode(tokenizer, e.prompt, e.response, tok_cfg)
        cut.add_encoded(e.id, enc, tok_cfg)
        encoded.append((e.id, enc))
    if where and (msg := cut.message(tok_cfg, where)):
        print(msg)
    return Source(np.array([len(e.ids) for _, e in encoded], dtype=np.int64),
                  lambda idx: collate_examples([encoded[i] for i in idx], pad_id),
                  hash_json([[i, e.ids, e.response_start] for i, e in encoded]),
                  lambda idx: [examples[i] for i in idx])


def same_teacher(train: CacheReader, valid: CacheReader) -> None:
    a, b = train.manifest, valid.manifest
    if (a.head_sha256, a.fingerprint_inputs.get("teacher"), a.same_tokenizer) != (
        b.head_sha256, b.fingerprint_inputs.get("teacher"), b.same_tokenizer
    ):
        raise ConfigError(f"valid.cache {valid.dir} was built with another teacher than the training cache {train.dir}")
