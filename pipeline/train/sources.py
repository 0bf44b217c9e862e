"""What stage 2 trains on, read by row index: a teacher cache (the teacher side included) or tokenized examples
(plain SFT)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cache import views
from pipeline.cache.batch import Batch, collate_cache_rows, collate_examples
from pipeline.cache.schema import DATA_FILE, MANIFEST
from pipeline.cache.store import CacheError, CacheReader, read_manifest, resolve_cache_dir, view_dir
from pipeline.config import ConfigError, DataConfig, ModelRef
from pipeline.data.records import Example, load_examples
from pipeline.data.tokenize import Truncation, encode
from pipeline.io_utils import hash_json
from pipeline.models.load import tokenizer_fingerprint
from pipeline.train.distributed import env_rank_world


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
                  reader.fingerprint, examples)


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


def same_teacher(train_dir: Path, a, other_dir: Path, b) -> None:
    """The caches with manifests `a` (training) and `b` come from one teacher (weights, head, tokenizer)."""
    if (a.head_sha256, a.fingerprint_inputs.get("teacher"), a.teacher_tokenizer_fingerprint) != (
        b.head_sha256, b.fingerprint_inputs.get("teacher"), b.teacher_tokenizer_fingerprint
    ):
        raise ConfigError(f"{other_dir} was built with another teacher than the training cache {train_dir}")


# a process other than rank 0 waits this long for rank 0 to build a missing student view
VIEW_WAIT_S = 3600.0


def open_for_student(cache: str | Path, student_tok, student_ref: ModelRef | None = None) -> CacheReader:
    """The cache at `cache` read for the student with tokenizer `student_tok`: directly when it is the teacher's,
    else through its student view, built first when missing (by rank 0 of a multi-process launch; the others wait
    for its manifest)."""
    cache_dir = resolve_cache_dir(cache)
    m = read_manifest(cache_dir)
    fp = tokenizer_fingerprint(student_tok)
    ref = views.ref_text(student_ref)
    target = view_dir(cache_dir, m, fp) / MANIFEST
    if fp != m.teacher_tokenizer_fingerprint and not target.is_file():
        if env_rank_world()[0] == 0:
            print(f"align: {cache_dir} has no student view for this student's tokenizer ({fp[:12]}); building it")
            views.build(cache_dir, student_tok)
        else:
            end = time.monotonic() + VIEW_WAIT_S
            while not target.is_file():
                if time.monotonic() > end:
                    raise CacheError(f"{cache_dir}: rank 0 did not build the student view in {VIEW_WAIT_S:.0f} s; build "
                                     f"it first with `dskd align {cache_dir} --student-tokenizer {ref}`")
                time.sleep(1.0)
    return CacheReader(cache_dir, student_tokenizer=fp, student_ref=ref)
