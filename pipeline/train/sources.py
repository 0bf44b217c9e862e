"""What stage 2 trains on, read by row index: a teacher cache (the teacher side included) or tokenized examples
(plain SFT)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
    return Source(reader.lengths()[:n], lambda idx: collate_cache_rows([reader[i] for i in idx], pad_id),
                  reader.fingerprint, _examples_of(reader, lambda idx: idx))


def _examples_of(reader: CacheReader, rows: Callable[[list[int]], list[int]]) -> Callable[[list[int]], list[Example]]:
    """The examples of a source's rows (`rows` maps them to the reader's), from the cache's own copy of its data,
    read on first use."""
    by_id: dict[str, Example] = {}

    def examples(idx: list[int]) -> list[Example]:
        if not by_id:
            by_id.update((e.id, e) for e in load_examples(DataConfig(path=str(reader.dir / DATA_FILE), id_field="id")))
        return [by_id[reader[i].id] for i in rows(idx)]

    return examples


def joint_source(readers: list[CacheReader], pad_id: int) -> tuple[Source, int]:
    """Several teachers' caches (each read for the student) as one source: the rows whose id every cache holds, in
    the first cache's order, each micro-batch collated from every cache (`Batch.others`: the further teachers'),
    the student's tokens checked equal across them. Returns (the source, the rows left out)."""
    ids = [r.ids() for r in readers]
    where = [{x: i for i, x in enumerate(each)} for each in ids]
    common = [i for i, x in enumerate(ids[0]) if all(x in w for w in where[1:])]
    left_out = len(set().union(*map(set, ids))) - len(common)
    if not common:
        raise ConfigError(f"teachers: no row id is in every cache ({', '.join(str(r.dir) for r in readers)}); build "
                          "them over the same data")
    index = [np.array([w[ids[0][i]] for i in common], dtype=np.int64) for w in where]
    lengths = [r.lengths()[ix] for r, ix in zip(readers, index)]
    for r, n in zip(readers[1:], lengths[1:]):
        if (bad := np.flatnonzero(n != lengths[0])).size:
            raise ConfigError(f"teachers: row {ids[0][common[bad[0]]]!r} is {n[bad[0]]} student tokens in {r.dir} and "
                              f"{lengths[0][bad[0]]} in {readers[0].dir}: the caches tokenize the data differently "
                              "(tokenize settings); build them with the same ones")

    def collate(idx: list[int]) -> Batch:
        first, *others = (collate_cache_rows([r[int(ix[j])] for j in idx], pad_id) for r, ix in zip(readers, index))
        for r, b in zip(readers[1:], others):
            if not (torch.equal(b.input_ids, first.input_ids) and torch.equal(b.labels, first.labels)):
                raise ConfigError(f"teachers: rows {first.ids[:4]}: the student's tokens in {r.dir} are not those in "
                                  f"{readers[0].dir} (tokenize settings); build the caches with the same ones")
        first.others = others
        return first

    return (Source(lengths[0], collate, hash_json([r.fingerprint for r in readers]),
                   _examples_of(readers[0], lambda idx: [int(index[0][j]) for j in idx])), left_out)


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
