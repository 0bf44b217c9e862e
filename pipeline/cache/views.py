"""Student views (`dskd align`, stages/align.py): a teacher cache read by one student tokenizer, built on the CPU
without any model.

teacher cache (its data.jsonl, its saved teacher tokenizer, the top-1 column) + a student tokenizer -> per row the
student ids, the exact-token pairs, `align_label` (the cached teacher top-1 translated), the chunks, and once the
vocabulary map -> `views/<fingerprint[:12]>/` inside the cache directory: one shard per teacher shard (same rows, same
order; temporary name then rename), the manifest last, resumable, one writer at a time. The teacher side is
re-tokenized from the saved tokenizer and must reproduce the cached teacher ids row for row, so a view can only be
built from the text the teacher read. Several views live beside one teacher cache, one per student tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import lock
from pipeline.cache.schema import (
    DATA_FILE,
    MANIFEST,
    MINED_MAP_FILE,
    SHARD_PATTERN,
    STUDENT_TOKENIZER,
    TEACHER_TOKENIZER,
    VIEWS_DIR,
    VOCAB_MAP_FILE,
    ViewManifest,
    list_column,
    view_schema,
)
from pipeline.cache.store import (
    CacheError,
    CacheReader,
    CacheWriter,
    file_problems,
    read_manifest,
    resolve_cache_dir,
    view_dir,
    view_inputs,
)
from pipeline.config import (
    DataConfig,
    ModelRef,
    TeacherCacheConfig,
    TokenizeConfig,
    config_to_dict,
    load_config,
)
from pipeline.data.alignment import aligned_labels, edit_distance_vocab_map, encode_pair, tokenizer_label_map
from pipeline.data.records import load_examples
from pipeline.data.tokenize import TokenizerError, Truncation, special_ids, token_surfaces
from pipeline.io_utils import atomic_save_npy, atomic_write_text, hash_json, sha256_file
from pipeline.models.load import load_tokenizer, save_tokenizer, tokenizer_fingerprint


def build(cache: str | Path, student_tok, *, repair: bool = False) -> Path | None:
    """The student view of the teacher cache at `cache` (a cache directory or root) for `student_tok`: built if
    missing, resumed if unfinished, left alone if finished (with `repair`, its shards re-checked by sha256 and the bad
    ones rebuilt). Returns its directory, or None when the student reads the teacher cache directly (same tokenizer)."""
    cache_dir = resolve_cache_dir(cache)
    m = read_manifest(cache_dir)
    fp = tokenizer_fingerprint(student_tok)
    if fp == m.teacher_tokenizer_fingerprint:
        return None
    special_ids(student_tok)  # a student tokenizer without EOS: refused before any work
    inputs = view_inputs(m, fp)
    fingerprint = hash_json(inputs)
    writer = CacheWriter(cache_dir / VIEWS_DIR, fingerprint[:12], fingerprint)
    where = writer.dir.parent if writer.dir.parent.is_dir() else cache_dir
    if not (writer.dir / MANIFEST).is_file() and not os.access(where, os.W_OK):
        raise CacheError(f"{where} cannot be written, so this student's view of the cache (tokenizer {fp[:12]}) cannot "
                         f"be built beside it; have the cache's owner run `dskd align {cache_dir} --student-tokenizer "
                         "<this student's tokenizer>`, or copy the cache somewhere writable")
    with lock.writer(writer.dir, "align"):
        if not writer.needs_work(repair, lambda v, deep: file_problems(writer.dir, _view_files(v), deep),
                                 kind=ViewManifest, what="align"):
            print(f"align: {writer.dir} is up to date")
            return writer.dir
        teacher_tok, tok_cfg, examples = _teacher_side(cache_dir, m)
        for e in examples:  # generated rows are read as the ids they were sampled as: only by that tokenizer
            if e.generated and e.tokenizer != fp:
                raise TokenizerError(f"{cache_dir / DATA_FILE}: row {e.id!r}: its token ids belong to tokenizer "
                                     f"{e.tokenizer[:12]}, not this student's ({fp[:12]}); only that tokenizer's "
                                     "students can read this cache")
        writer.begin()
        label_map = tokenizer_label_map(teacher_tok, student_tok)
        atomic_save_npy(writer.dir / VOCAB_MAP_FILE, label_map.exact)
        save_tokenizer(student_tok, writer.dir / STUDENT_TOKENIZER)
        n_shards = len(m.shards)
        done = writer.complete_shards(n_shards)
        reader = CacheReader(cache_dir)  # the teacher's rows, each shard's sha256 checked as it is read
        starts = np.cumsum([0] + [s.rows for s in m.shards])
        cut = Truncation()
        for i in (i for i in range(n_shards) if i not in done):
            rows = examples[starts[i] : starts[i + 1]]
            table = _view_shard(reader.table(i), rows, teacher_tok, student_tok, tok_cfg, label_map, m.top_k, cut,
                                where=f"{cache_dir / SHARD_PATTERN.format(i)}")
            writer.write_shard(i, table)
        if msg := cut.message(tok_cfg, "align: student"):
            print(msg)
        view = writer.finish({"fingerprint_inputs": inputs, "teacher_fingerprint": m.fingerprint,
                              "student_tokenizer_fingerprint": fp,
                              "vocab_map_sha256": sha256_file(writer.dir / VOCAB_MAP_FILE)},
                             n_shards, kind=ViewManifest, tokens_column="student_ids")
    print(f"align: {view.rows} rows, {view.response_tokens} student response tokens, {n_shards} shard(s) -> {writer.dir}")
    return writer.dir


def repair_views(cache: str | Path) -> list[Path]:
    """`dskd cache verify --repair`: every student view beside a teacher cache, checked by sha256 and the bad
    shards rebuilt, each from the student tokenizer saved in it. A view whose tokenizer is lost is reported."""
    cache_dir = resolve_cache_dir(cache)
    out = []
    for d in view_dirs(cache_dir):
        if not (d / STUDENT_TOKENIZER).is_dir():
            print(f"align: {d}: its student tokenizer is missing; remove the view and rebuild it with `dskd align "
                  f"{cache_dir} --student-tokenizer <the student tokenizer>`")
            continue
        tok = load_tokenizer(ModelRef(path=str(d / STUDENT_TOKENIZER)))
        try:
            recorded = read_manifest(d, ViewManifest).student_tokenizer_fingerprint
        except CacheError:
            recorded = None  # an unfinished view (or a lost manifest): the tokenizer saved in it says whose it is
        if recorded not in (None, tokenizer_fingerprint(tok)) or \
                view_dir(cache_dir, read_manifest(cache_dir), tokenizer_fingerprint(tok)) != d:
            print(f"align: {d} is not this cache's view for the tokenizer saved in it (the cache or the tokenizer "
                  "changed); remove it")
            continue
        out.append(build(cache_dir, tok, repair=True))
    return out


def mined_map(reader: CacheReader, student_tok) -> np.ndarray:
    """MinED's (V_T,) teacher -> student map for the student `reader` reads the cache for: the exact map, and the
    student token at the smallest edit distance where it has none. Kept in the view by the first run that needs it
    (minutes at a 262k teacher vocabulary), beside its sha256; a later run reads it back when the sha256 holds."""
    exact = reader.vocab_map()
    path = reader.view_dir / MINED_MAP_FILE
    stamp = path.with_name(path.name + ".sha256")
    if path.is_file() and stamp.is_file() and sha256_file(path) == stamp.read_text().strip():
        return np.load(path)
    teacher_tok = load_tokenizer(ModelRef(path=str(reader.dir / TEACHER_TOKENIZER)))
    out = edit_distance_vocab_map(token_surfaces(teacher_tok), token_surfaces(student_tok), exact)
    atomic_save_npy(path, out)
    atomic_write_text(stamp, sha256_file(path) + "\n")
    return out


def views(cache: str | Path) -> list[Path]:
    """The finished student views beside a teacher cache."""
    return [d for d in view_dirs(resolve_cache_dir(cache)) if (d / MANIFEST).is_file()]


def view_dirs(cache_dir: Path) -> list[Path]:
    """The student views beside a teacher cache (finished or not)."""
    root = Path(cache_dir) / VIEWS_DIR
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.is_dir() else []


def _view_files(v: ViewManifest) -> dict[str, str | None]:
    return {VOCAB_MAP_FILE: v.vocab_map_sha256, f"{STUDENT_TOKENIZER}/tokenizer.json": None}


def _teacher_side(cache_dir: Path, m) -> tuple:
    """(the teacher tokenizer saved with the cache, its tokenization settings, its rows), each checked against the
    manifest: the tokenizer's fingerprint, the settings it was built with, the number of rows."""
    teacher_tok = load_tokenizer(ModelRef(path=str(cache_dir / TEACHER_TOKENIZER)))
    if tokenizer_fingerprint(teacher_tok) != m.teacher_tokenizer_fingerprint:
        raise CacheError(f"{cache_dir / TEACHER_TOKENIZER}: not the tokenizer the cache was built with (fingerprint "
                         f"{tokenizer_fingerprint(teacher_tok)[:12]}, the manifest's {m.teacher_tokenizer_fingerprint[:12]}); "
                         f"repair it with `dskd cache verify --repair {cache_dir}`")
    tok_cfg = _tokenize_settings(cache_dir, m)
    examples = load_examples(DataConfig(path=str(cache_dir / DATA_FILE), id_field="id"))
    if len(examples) != m.rows:
        raise CacheError(f"{cache_dir / DATA_FILE}: {len(examples)} rows, the cache has {m.rows}; repair it with "
                         f"`dskd cache verify --repair {cache_dir}`")
    return teacher_tok, tok_cfg, examples


def _tokenize_settings(cache_dir: Path, m) -> TokenizeConfig:
    cfg = load_config(TeacherCacheConfig, cache_dir / "config.yaml")
    if config_to_dict(cfg.tokenize) != m.fingerprint_inputs.get("tokenize"):
        raise CacheError(f"{cache_dir / 'config.yaml'}: its tokenize settings are not the ones the cache was built "
                         "with (edited?); restore them or rebuild the cache")
    return cfg.tokenize


def _view_shard(teacher: pa.Table, rows: list, teacher_tok, student_tok, tok_cfg, label_map, k: int, cut: Truncation,
                where: str) -> pa.Table:
    """One view shard: the student side of the teacher shard `teacher`'s rows (`rows`: their examples, in order)."""
    schema = view_schema()
    ids = teacher["id"].to_pylist()
    t_ids, t_starts = teacher["teacher_ids"], teacher["teacher_response_start"].to_pylist()
    top1 = teacher["topk_ids"]
    students, labels, pairs, chunks, ratios = [], [], [], [], []
    for j, e in enumerate(rows):
        if e.id != ids[j]:
            raise CacheError(f"{where}: row {j} is {ids[j]!r}, the cache's data.jsonl says {e.id!r}")
        t, s, al = encode_pair(e, teacher_tok, student_tok, tok_cfg)
        cached = t_ids[j].values.to_numpy()
        if t.response_start != t_starts[j] or not np.array_equal(np.asarray(t.ids, np.int32), cached):
            raise CacheError(f"{where}: row {j} ({e.id!r}): the saved teacher tokenizer does not reproduce the cached "
                             "teacher ids; the cache is inconsistent, rebuild it")
        cut.add_encoded(e.id, s, tok_cfg)
        first = top1[j].values.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)[:, 0]
        students.append(s)
        labels.append(aligned_labels(first, al.pairs, t, s, label_map))
        pairs.append(al.pairs)
        chunks.append(al.chunks)
        ratios.append(len(al.pairs) / s.n_response)
    cols = {
        "id": pa.array(ids, pa.string()),
        "student_ids": list_column([np.asarray(s.ids, np.int32) for s in students], schema.field("student_ids").type),
        "student_response_start": pa.array([s.response_start for s in students], pa.int32()),
        "align_student": list_column([p[:, 0] for p in pairs], schema.field("align_student").type),
        "align_teacher": list_column([p[:, 1] for p in pairs], schema.field("align_teacher").type),
        "align_label": list_column(labels, schema.field("align_label").type),
        "align_ratio": pa.array(ratios, pa.float32()),
        "chunks": list_column(chunks, schema.field("chunks").type),
    }
    return pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)



def ref_text(ref: ModelRef | None) -> str | None:
    """A tokenizer reference as `dskd align`'s arguments."""
    if ref is None:
        return None
    return f"{ref.path}" + (f" --gguf-file {ref.gguf_file}" if ref.gguf_file else "")
