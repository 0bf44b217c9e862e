"""Cache shard writer (temporary name then rename, manifest last, resumable) and reader (validates manifest).

Writer protocol, so that a killed run never leaves a half shard visible and a re-run resumes or refuses:
1. `_progress.json` records the fingerprint of the cache being built; a directory holding another fingerprint
   (in progress or finished) is refused, never mixed.
2. Shard i holds rows [i * rows_per_shard, (i+1) * rows_per_shard) of the stage's deterministic row order; it is
   written to a hidden temporary file, fsynced and renamed to `shard-0000i.arrow`.
3. After the last shard, `manifest.json` (rows, sha256 per shard) is written and `_progress.json` removed.
A re-run with the same fingerprint skips the shards already present; a finished cache is left untouched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.cache_schema import (
    MANIFEST,
    PROGRESS,
    SCHEMA_VERSION,
    SHARD_PATTERN,
    Manifest,
    ShardInfo,
    hidden_from_numpy,
)
from pipeline.head import HEAD_FILE, OutputHead
from pipeline.io_utils import hash_json, sha256_file, write_json


class CacheError(RuntimeError):
    """The cache directory is unusable as asked (mismatch, corruption, incomplete)."""


# --------------------------------------------------------------------------------------------------------------
# Writing


class CacheWriter:
    def __init__(self, out_dir: Path, fingerprint: str, rows_per_shard: int):
        self.dir = Path(out_dir)
        self.fingerprint = fingerprint
        self.rows_per_shard = rows_per_shard

    def status(self) -> str:
        """'done' (finished, same fingerprint), 'resume' or 'new'. Raises CacheError on another fingerprint."""
        manifest = self.dir / MANIFEST
        if manifest.exists():
            found = json.loads(manifest.read_text()).get("fingerprint")
            if found != self.fingerprint:
                raise CacheError(
                    f"{self.dir} holds a finished cache with fingerprint {str(found)[:12]}, not {self.fingerprint[:12]} "
                    "(teacher, tokenizers, data or settings changed); choose another out_dir or delete it"
                )
            return "done"
        progress = self.dir / PROGRESS
        if progress.exists():
            found = json.loads(progress.read_text()).get("fingerprint")
            if found != self.fingerprint:
                raise CacheError(
                    f"{self.dir} holds an unfinished cache with fingerprint {str(found)[:12]}, not "
                    f"{self.fingerprint[:12]}; refusing to mix (choose another out_dir or delete it)"
                )
            return "resume"
        if self.dir.exists() and any(self.dir.iterdir()):
            raise CacheError(f"{self.dir} is not empty and holds no cache; refusing to write into it")
        return "new"

    def begin(self) -> int:
        """Prepare the directory; return the number of complete shards already present."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / PROGRESS, {"fingerprint": self.fingerprint, "rows_per_shard": self.rows_per_shard})
        for stale in self.dir.glob(".shard-*.tmp*"):  # a shard that was being written when the run was killed
            stale.unlink()
        done = 0
        while (self.dir / SHARD_PATTERN.format(done)).exists():
            done += 1
        return done

    def write_shard(self, index: int, columns: dict[str, list], schema: pa.Schema) -> Path:
        final = self.dir / SHARD_PATTERN.format(index)
        tmp = self.dir / f".{final.name}.tmp-{os.getpid()}"
        table = pa.Table.from_pydict(columns, schema=schema)
        try:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                writer.write_table(table)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            raise CacheError(f"writing {final}: {e.strerror or e} (no partial shard was left)") from e
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def finish(self, manifest_fields: dict) -> Manifest:
        shards = []
        for path in sorted(self.dir.glob("shard-*.arrow")):
            table = _open_table(path)
            shards.append(
                ShardInfo(
                    file=path.name,
                    rows=table.num_rows,
                    response_tokens=int(pc.sum(pc.list_value_length(table["lse"])).as_py() or 0),
                    bytes=path.stat().st_size,
                    sha256=sha256_file(path),
                )
            )
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            fingerprint=self.fingerprint,
            rows=sum(s.rows for s in shards),
            response_tokens=sum(s.response_tokens for s in shards),
            shards=shards,
            **manifest_fields,
        )
        if hash_json(manifest.fingerprint_inputs) != self.fingerprint:
            raise CacheError("internal: fingerprint does not hash its inputs")
        write_json(self.dir / MANIFEST, manifest.to_dict())
        (self.dir / PROGRESS).unlink(missing_ok=True)
        return manifest


# --------------------------------------------------------------------------------------------------------------
# Reading


def _open_table(path: Path) -> pa.Table:
    """Memory-map an Arrow IPC file (no copy of the columns into RAM)."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


@dataclass
class CacheRow:
    id: str
    student_ids: np.ndarray  # (n_s,) int32
    student_response_start: int
    teacher_ids: np.ndarray  # (n_t,) int32
    teacher_response_start: int
    hidden: torch.Tensor  # (n_resp, d) in the cache's hidden dtype
    topk_ids: torch.Tensor  # (n_resp, k) int32
    topk_logits: torch.Tensor  # (n_resp, k) float32
    lse: torch.Tensor  # (n_resp,) float32


def read_manifest(cache_dir: Path) -> Manifest:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        hint = " (an unfinished cache: re-run teacher-cache to complete it)" if (path.parent / PROGRESS).exists() else ""
        raise CacheError(f"{path.parent}: no {MANIFEST}{hint}")
    raw = json.loads(path.read_text())
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(
            f"{path}: schema version {raw.get('schema_version')} is not {SCHEMA_VERSION}; rebuild the cache with this version"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except TypeError as e:  # missing or unknown fields
        raise CacheError(f"{path}: malformed manifest ({e})") from None
    if hash_json(manifest.fingerprint_inputs) != manifest.fingerprint:
        raise CacheError(f"{path}: fingerprint does not match the recorded inputs (manifest edited or corrupted)")
    return manifest


class CacheReader:
    """Map-style access to cache rows across shards, memory-mapped, each shard's sha256 checked on first use."""

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        expect_fingerprint: str | None = None,
        expect_student_tokenizer: str | None = None,
        verify: bool = True,
    ):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        m = self.manifest
        if expect_fingerprint is not None and m.fingerprint != expect_fingerprint:
            raise CacheError(f"{self.dir}: fingerprint {m.fingerprint[:12]} is not the expected {expect_fingerprint[:12]}")
        if expect_student_tokenizer is not None and m.student_tokenizer_fingerprint != expect_student_tokenizer:
            raise CacheError(
                f"{self.dir}: the cache was built for another student tokenizer "
                f"({m.student_tokenizer_fingerprint[:12]} vs this student's {expect_student_tokenizer[:12]})"
            )
        self.verify = verify
        self._tables: dict[int, pa.Table] = {}
        self._starts = np.cumsum([0] + [s.rows for s in m.shards])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _table(self, shard: int) -> pa.Table:
        if shard not in self._tables:
            info = self.manifest.shards[shard]
            path = self.dir / info.file
            if not path.exists():
                raise CacheError(f"{path}: shard listed in the manifest is missing")
            if self.verify and sha256_file(path) != info.sha256:
                raise CacheError(f"{path}: sha256 mismatch (shard corrupted or replaced)")
            table = _open_table(path)
            if table.num_rows != info.rows:
                raise CacheError(f"{path}: {table.num_rows} rows, manifest says {info.rows}")
            self._tables[shard] = table
        return self._tables[shard]

    def __getitem__(self, i: int) -> CacheRow:
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        t = self._table(shard)
        j = i - int(self._starts[shard])
        m = self.manifest

        def matrix(col: str, width: int) -> np.ndarray:
            flat = t[col][j].values.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape(-1, width)

        return CacheRow(
            id=t["id"][j].as_py(),
            student_ids=t["student_ids"][j].values.to_numpy(),
            student_response_start=t["student_response_start"][j].as_py(),
            teacher_ids=t["teacher_ids"][j].values.to_numpy(),
            teacher_response_start=t["teacher_response_start"][j].as_py(),
            hidden=hidden_from_numpy(matrix("hidden", m.hidden_size), m.hidden_dtype),
            topk_ids=torch.from_numpy(matrix("topk_ids", m.top_k).copy()),
            topk_logits=torch.from_numpy(matrix("topk_logits", m.top_k).copy()),
            lse=torch.from_numpy(t["lse"][j].values.to_numpy(zero_copy_only=False).copy()),
        )

    def load_head(self, device: torch.device | str = "cpu") -> OutputHead:
        """The teacher output head saved with the cache, checked against the manifest's sha256."""
        path = self.dir / HEAD_FILE
        if not path.exists() or (self.verify and sha256_file(path) != self.manifest.head_sha256):
            raise CacheError(f"{path}: missing or sha256 mismatch (head corrupted or replaced)")
        return OutputHead.load(path).to(device)

    def ids(self) -> list[str]:
        return [x for s in range(len(self.manifest.shards)) for x in self._table(s)["id"].to_pylist()]
