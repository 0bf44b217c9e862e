"""`dskd cache upgrade`: a version-5 (pairwise) cache converted to version 6 without the teacher.

Version 5 stored one (teacher, student tokenizer) pair per cache; version 6 stores the teacher's rows in a teacher
cache and the student's side in a student view beside it. The teacher columns are the same bytes in both, so the
conversion copies them into a new cache directory `<teacher>-<new fingerprint[:12]>` beside the old one (the old one
is left for the user to remove), with the once-per-cache files, and, for a cross-tokenizer cache, writes the student
columns as the view of the student tokenizer the cache was built for. The result is what stage 1 of version 6 writes
for the same teacher, data and settings, shard for shard; CURRENT then names it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa

from pipeline import lock
from pipeline.cache.schema import (
    CHANNEL_SCALE_FILE,
    DATA_FILE,
    EMBEDDINGS_FILE,
    MANIFEST,
    SCHEMA_VERSION,
    STORAGE_META,
    STUDENT_TOKENIZER,
    TEACHER_TOKENIZER,
    VIEWS_DIR,
    VOCAB_MAP_FILE,
    ViewManifest,
    arrow_schema,
    view_schema,
)
from pipeline.cache.store import (
    UPGRADABLE,
    CacheError,
    CacheWriter,
    cache_dir_name,
    read_manifest,
    resolve_cache_dir,
    view_inputs,
)
from pipeline.io_utils import hash_json, sha256_file
from pipeline.models.head import HEAD_FILE

# the version-5 manifest fields that version 6 moved into the view or dropped
_STUDENT_FIELDS = ("same_tokenizer", "student_tokenizer_fingerprint")
_RECOMPUTED = ("schema_version", "fingerprint", "fingerprint_inputs", "rows", "response_tokens", "shards")


def upgrade(path: str | Path) -> Path:
    """Convert the version-5 cache at `path` (a cache directory or root); return the version-6 cache directory (a
    version-6 cache is returned as it is)."""
    old = resolve_cache_dir(path)
    try:
        raw = json.loads((old / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        raise CacheError(f"{old}: no readable {MANIFEST}; only a finished cache converts") from None
    if raw.get("schema_version") == SCHEMA_VERSION:
        print(f"cache upgrade: {old} is already version {SCHEMA_VERSION}")
        return old
    if raw.get("schema_version") != UPGRADABLE:
        raise CacheError(f"{old}: version {raw.get('schema_version')} does not convert (only {UPGRADABLE} does); "
                         f"rebuild it: `dskd teacher-cache --config {old / 'config.yaml'}`")
    if hash_json(raw["fingerprint_inputs"]) != raw["fingerprint"]:
        raise CacheError(f"{old / MANIFEST}: fingerprint does not match the recorded inputs (manifest edited or corrupted)")
    inputs = {k: v for k, v in raw["fingerprint_inputs"].items() if k != "student_tokenizer"}
    inputs["schema_version"] = SCHEMA_VERSION
    fingerprint = hash_json(inputs)
    writer = CacheWriter(old.parent, cache_dir_name(raw["teacher_name"], fingerprint), fingerprint)
    with lock.writer(writer.dir, "cache upgrade"):
        if writer.status() != "done":
            _teacher(old, raw, writer, inputs)
        else:
            writer.mark_current()
    new = read_manifest(writer.dir)
    if not raw["same_tokenizer"]:
        _view(old, raw, writer.dir, new)
    print(f"cache upgrade: {old} -> {writer.dir} (version {SCHEMA_VERSION}); the old directory can be removed")
    return writer.dir


def _teacher(old: Path, raw: dict, writer: CacheWriter, inputs: dict) -> None:
    writer.begin()
    for name in (HEAD_FILE, DATA_FILE, "config.yaml", EMBEDDINGS_FILE, CHANNEL_SCALE_FILE, TEACHER_TOKENIZER):
        _copy(old / name, writer.dir / name)
    schema = arrow_schema(raw["hidden_size"], raw["top_k"], raw["hidden_encoding"])
    for i, info in enumerate(raw["shards"]):
        table = _checked(old, info)
        meta = {STORAGE_META: (table.schema.metadata or {})[STORAGE_META]}
        writer.write_shard(i, pa.Table.from_arrays([table[c] for c in schema.names], schema=schema.with_metadata(meta)))
    fields = {k: v for k, v in raw.items() if k not in _STUDENT_FIELDS + _RECOMPUTED}
    writer.finish({**fields, "fingerprint_inputs": inputs}, len(raw["shards"]))


def _view(old: Path, raw: dict, cache_dir: Path, manifest) -> None:
    inputs = view_inputs(manifest, raw["student_tokenizer_fingerprint"])
    fingerprint = hash_json(inputs)
    writer = CacheWriter(cache_dir / VIEWS_DIR, fingerprint[:12], fingerprint)
    with lock.writer(writer.dir, "cache upgrade"):
        if writer.status() == "done":
            return
        writer.begin()
        _copy(old / VOCAB_MAP_FILE, writer.dir / VOCAB_MAP_FILE)
        _copy(old / STUDENT_TOKENIZER, writer.dir / STUDENT_TOKENIZER)
        schema = view_schema()
        for i, info in enumerate(raw["shards"]):
            table = _checked(old, info)
            writer.write_shard(i, pa.Table.from_arrays([table[c] for c in schema.names], schema=schema))
        writer.finish({"fingerprint_inputs": inputs, "teacher_fingerprint": manifest.fingerprint,
                       "student_tokenizer_fingerprint": raw["student_tokenizer_fingerprint"],
                       "vocab_map_sha256": sha256_file(writer.dir / VOCAB_MAP_FILE)},
                      len(raw["shards"]), kind=ViewManifest, tokens_column="student_ids")


def _checked(old: Path, info: dict) -> pa.Table:
    """A version-5 shard, its sha256 checked against the old manifest."""
    path = old / info["file"]
    if not path.is_file() or sha256_file(path) != info["sha256"]:
        raise CacheError(f"{path}: missing or sha256 mismatch; repair the cache with the version of dskd that built it "
                         f"(or rebuild it: `dskd teacher-cache --config {old / 'config.yaml'}`)")
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def _copy(src: Path, dst: Path) -> None:
    """A once-per-cache file or directory, when the old cache has it (temporary name, then rename)."""
    if not src.exists():
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.unlink(missing_ok=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
    else:
        shutil.copy2(src, tmp)
    tmp.replace(dst)

