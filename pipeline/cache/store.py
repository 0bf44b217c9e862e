"""Cache shard writer (temporary name then rename, manifest last, resumable) and reader (validates manifest).

Layout: a cache root (the stage's `out_dir`) holds one directory per fingerprint, `<teacher>-<fingerprint[:12]>`,
and a `CURRENT` file naming the one the last stage-1 run finished; readers accept the root or a cache directory.
A cache directory holds the teacher's rows and, under `views/`, one student view per other student tokenizer
(schema.py); a reader opened for a student joins the two by row position, checking each row's id.

Writer protocol, so that a killed run never leaves a half shard visible and a re-run resumes or refuses:
1. `_progress.json` records the fingerprint of the cache being built.
2. Shard i holds rows [i * rows_per_shard, (i+1) * rows_per_shard) of the data order; it is written to a hidden
   temporary file, fsynced and renamed to `shard-0000i.arrow`. Ranks write disjoint shards (i mod world).
3. After the last shard, `manifest.json` (rows, sha256 per shard) is written, `_progress.json` removed and
   CURRENT updated.
A re-run with the same fingerprint skips the shards already present; a finished cache is left untouched.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.cache.schema import (
    CHANNEL_SCALE_FILE,
    CURRENT,
    EMBEDDINGS_FILE,
    MANIFEST,
    PROGRESS,
    SCHEMA_VERSION,
    SHARD_PATTERN,
    VIEWS_DIR,
    VOCAB_MAP_FILE,
    Manifest,
    ShardInfo,
    ViewManifest,
    decode_hidden,
)
from pipeline.io_utils import hash_json, sha256_file, write_json, write_text_if_changed
from pipeline.models.head import HEAD_FILE, OutputHead

# the version `dskd cache upgrade` converts (pipeline/cache/upgrade.py): its teacher columns are version 6's
UPGRADABLE = 5


class CacheError(RuntimeError):
    """The cache directory is unusable as asked (mismatch, corruption, incomplete)."""


# --------------------------------------------------------------------------------------------------------------
# Writing


def cache_dir_name(teacher_name: str, fingerprint: str) -> str:
    """One directory per fingerprint under the cache root: changing anything that the fingerprint covers builds a
    new cache beside the old one instead of mixing rows."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in teacher_name)
    return f"{safe}-{fingerprint[:12]}"


def resolve_cache_dir(path: str | Path) -> Path:
    """A cache directory (holding manifest.json or an unfinished build) or a cache root, whose CURRENT file names
    the cache the last stage-1 run finished."""
    path = Path(path)
    if (path / MANIFEST).exists() or (path / PROGRESS).exists():
        return path
    current = path / CURRENT
    if current.exists():
        return path / current.read_text().strip()
    if any(path.glob("shard-*.arrow")):
        raise CacheError(f"{path}: the shards are here but {MANIFEST} is lost; rebuild it with "
                         f"`dskd cache verify --repair {path}` (or re-run teacher-cache)")
    raise CacheError(f"{path}: neither a teacher cache (no {MANIFEST}) nor a cache root (no {CURRENT}); run teacher-cache")


# Arrow schema metadata every shard carries, so that a lost manifest can be rebuilt from the shards themselves
SHARD_META_FINGERPRINT, SHARD_META_INDEX = b"dskd_fingerprint", b"dskd_shard"


def shard_metadata(path: Path) -> dict[bytes, bytes] | None:
    """The schema metadata of a shard file, or None when it cannot be opened as Arrow IPC (truncated, garbage)."""
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_file(source).schema.metadata or {}
    except (pa.ArrowInvalid, OSError):
        return None


def _recover_hint(cache_dir: Path) -> str:
    return f"repair it with `dskd cache verify --repair {cache_dir}` (recomputes only the bad shards)"


class CacheWriter:
    """Writes one cache directory `root/<name>`; several ranks may write disjoint shards of it."""

    def __init__(self, root: Path, name: str, fingerprint: str):
        self.root = Path(root)
        self.dir = self.root / name
        self.fingerprint = fingerprint

    def status(self) -> str:
        """'done' (finished), 'resume' (unfinished), 'orphan' (shards of this cache without a manifest: the
        manifest is rebuilt) or 'new'. Raises CacheError when the directory is not ours."""
        for marker in (MANIFEST, PROGRESS):
            path = self.dir / marker
            if path.exists():
                try:
                    found = json.loads(path.read_text()).get("fingerprint")
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    found = None  # unreadable: judged by the shards below
                else:
                    if found != self.fingerprint:  # only a hash-prefix collision or a hand-made directory
                        raise CacheError(f"{path}: fingerprint {str(found)[:12]} is not {self.fingerprint[:12]}; "
                                         f"refusing to mix (remove {self.dir} or choose another out_dir)")
                    return "done" if marker == MANIFEST else "resume"
        if not self.dir.exists() or not any(self.dir.iterdir()):
            return "new"
        fingerprints = {(shard_metadata(p) or {}).get(SHARD_META_FINGERPRINT) for p in self.dir.glob("shard-*.arrow")}
        if self.fingerprint.encode() in fingerprints:
            return "orphan"
        other = sorted(f.decode()[:12] for f in fingerprints if f)
        what = f"shards of another cache ({', '.join(other)})" if other else "no cache of this fingerprint"
        raise CacheError(f"{self.dir} is not empty and holds {what}; refusing to write into it (remove it or choose "
                         "another out_dir)")

    def shard_problems(self, manifest: Manifest, *, deep: bool) -> dict[int, str]:
        """Shards of a finished cache that are not what its manifest says: missing or of another size (always),
        or of another sha256 (`deep`). Index -> reason."""
        bad = {}
        for i, info in enumerate(manifest.shards):
            path = self.dir / info.file
            if not path.is_file():
                bad[i] = "missing"
            elif path.stat().st_size != info.bytes:
                bad[i] = f"{path.stat().st_size} bytes, the manifest says {info.bytes}"
            elif deep and sha256_file(path) != info.sha256:
                bad[i] = "sha256 mismatch"
        return bad

    def needs_work(self, repair: bool, file_problems, kind: type = Manifest, what: str = "teacher-cache") -> bool:
        """Is there work? A finished directory is re-checked (shard sizes and its other files, by
        `file_problems(manifest, deep)`, always; sha256 with `repair`); what is bad is removed, so the run recomputes
        only that. Shards without a manifest are adopted when their own metadata names this directory."""
        status = self.status()
        if status == "orphan":
            print(f"{what}: {self.dir} holds shards of this cache but no manifest; rebuilding it")
            return True
        if status != "done":
            return True
        try:
            manifest = read_manifest(self.dir, kind)
        except CacheError as e:
            print(f"{what}: {e}; rebuilding the manifest from the shards")
            self.reopen([])
            return True
        bad = self.shard_problems(manifest, deep=repair)
        files = file_problems(manifest, repair)
        if not bad and not files:
            return False
        problems = [f"shard {i} {why}" for i, why in sorted(bad.items())] + files
        print(f"{what}: {self.dir}: {'; '.join(problems[:4])}{' ...' if len(problems) > 4 else ''}; recomputing "
              f"{len(bad)} of {len(manifest.shards)} shard(s)")
        self.reopen(sorted(bad))
        return True

    def reopen(self, drop: list[int]) -> None:
        """Turn a finished cache back into an unfinished one: remove the shards in `drop`, then the manifest (in
        this order, so a run killed in between finds the manifest and the same problems again)."""
        for i in drop:
            (self.dir / SHARD_PATTERN.format(i)).unlink(missing_ok=True)
        write_json(self.dir / PROGRESS, {"fingerprint": self.fingerprint})
        (self.dir / MANIFEST).unlink(missing_ok=True)

    def begin(self) -> None:
        """Prepare the directory (rank 0 only, before any rank writes): progress marker, stale temporaries gone."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / PROGRESS, {"fingerprint": self.fingerprint})
        for stale in self.dir.glob(".shard-*.tmp*"):  # a shard that was being written when the run was killed
            stale.unlink()

    def present_shards(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.dir.glob("shard-*.arrow")}

    def complete_shards(self, n_shards: int | None = None) -> set[int]:
        """Shards on disk that are complete and this cache's own: readable, and their metadata names this
        fingerprint and their index (a shard that fails is deleted, to be recomputed)."""
        done = set()
        for p in self.dir.glob("shard-*.arrow"):
            try:
                index = int(p.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            meta = shard_metadata(p)
            ours = meta is not None and meta.get(SHARD_META_FINGERPRINT) == self.fingerprint.encode() \
                and meta.get(SHARD_META_INDEX) == str(index).encode() and (n_shards is None or index < n_shards)
            if ours:
                done.add(index)
            else:
                p.unlink(missing_ok=True)
        return done

    def write_shard(self, index: int, table: pa.Table) -> Path:
        """Write to a hidden temporary name, fsync, rename: a reader (or a resumed run) never sees half a shard.
        The shard's schema metadata names the cache's fingerprint and its index. A full disk or any other I/O
        error removes the temporary and raises CacheError naming the shard."""
        final = self.dir / SHARD_PATTERN.format(index)
        tmp = self.dir / f".{final.name}.tmp-{os.getpid()}"
        meta = {**(table.schema.metadata or {}), SHARD_META_FINGERPRINT: self.fingerprint.encode(),
                SHARD_META_INDEX: str(index).encode()}
        table = table.replace_schema_metadata(meta)
        try:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise CacheError(f"writing {final}: {reason}; no partial shard was left, re-run to resume") from e
        finally:
            tmp.unlink(missing_ok=True)
        return final

    def finish(self, manifest_fields: dict, n_shards: int, *, kind: type = Manifest,
               tokens_column: str = "lse") -> Manifest | ViewManifest:
        """Check that shards 0..n_shards-1 are all present, write the manifest (a `kind`; its response tokens
        counted as the lengths of `tokens_column`), then point CURRENT at this cache (a teacher cache)."""
        missing = sorted(set(range(n_shards)) - self.present_shards())
        if missing:
            raise CacheError(f"{self.dir}: shard(s) {missing[:5]} missing after the run; re-run to complete them")
        shards = []
        for i in range(n_shards):
            path = self.dir / SHARD_PATTERN.format(i)
            table = _open_table(path)
            shards.append(
                ShardInfo(
                    file=path.name,
                    rows=table.num_rows,
                    response_tokens=_response_tokens(table, tokens_column),
                    bytes=path.stat().st_size,
                    sha256=sha256_file(path),
                )
            )
        manifest = kind(
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
        if kind is Manifest:
            self.mark_current()
        return manifest

    def mark_current(self) -> None:
        write_text_if_changed(self.root / CURRENT, self.dir.name + "\n")


def file_problems(directory: Path, need: dict[str, str | None], deep: bool) -> list[str]:
    """Which of the files `need` (name -> sha256 or None) are missing from `directory` (or, `deep`, differ from
    their recorded sha256)."""
    problems = []
    for name, sha in need.items():
        if not (directory / name).is_file():
            problems.append(f"{name} missing")
        elif deep and sha is not None and sha256_file(directory / name) != sha:
            problems.append(f"{name} sha256 mismatch")
    return problems


def _response_tokens(table: pa.Table, column: str) -> int:
    """Response tokens of a shard: the lengths of a per-position column, or of the student's response (a view)."""
    if column == "student_ids":
        return int(pc.sum(pc.subtract(pc.list_value_length(table["student_ids"]),
                                      table["student_response_start"])).as_py() or 0)
    return int(pc.sum(pc.list_value_length(table[column])).as_py() or 0)


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
    hidden: torch.Tensor  # (n_resp, d): the stored dtype (exact mode) or float32 dequantized (compact mode)
    topk_ids: torch.Tensor  # (n_resp, k) int32
    topk_logits: torch.Tensor  # (n_resp, k) float32
    lse: torch.Tensor  # (n_resp,) float32
    target_logprob: torch.Tensor  # (n_resp,) float32, log-probability of the teacher's own next token
    # cross-tokenizer caches only: (K,) student / teacher label positions, student label or -100, K / student labels
    align_student: np.ndarray | None = None
    align_teacher: np.ndarray | None = None
    align_label: np.ndarray | None = None
    align_ratio: float | None = None
    chunks: np.ndarray | None = None  # (C, 4) int32 label-position ranges [s_begin, s_end, t_begin, t_end)


def read_manifest(cache_dir: Path, kind: type = Manifest) -> Manifest | ViewManifest:
    """The manifest of a teacher cache (or, `kind` ViewManifest, of a student view), checked: schema version,
    fields, fingerprint of its recorded inputs."""
    path = Path(cache_dir) / MANIFEST
    view = kind is ViewManifest
    if not path.exists():
        again = "an unfinished view: re-run `dskd align` for it" if view else \
            "an unfinished cache: re-run teacher-cache to complete it"
        hint = f" ({again})" if (path.parent / PROGRESS).exists() else ""
        raise CacheError(f"{path.parent}: no {MANIFEST}{hint}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CacheError(f"{path}: unreadable manifest") from None
    if raw.get("schema_version") != SCHEMA_VERSION:
        cache = path.parent.parent.parent if view else path.parent
        convert = f", or convert it without the teacher: `dskd cache upgrade {cache}`" \
            if raw.get("schema_version") == UPGRADABLE else ""
        raise CacheError(
            f"{path}: schema version {raw.get('schema_version')} is not {SCHEMA_VERSION} (built by another version of "
            f"dskd); rebuild it: `dskd teacher-cache --config {cache / 'config.yaml'}` (a new directory beside "
            f"it){convert}"
        )
    try:
        manifest = kind.from_dict(raw)
    except TypeError as e:  # missing or unknown fields
        raise CacheError(f"{path}: malformed manifest ({e})") from None
    if hash_json(manifest.fingerprint_inputs) != manifest.fingerprint:
        raise CacheError(f"{path}: fingerprint does not match the recorded inputs (manifest edited or corrupted)")
    return manifest


def view_inputs(manifest: Manifest, student_tokenizer: str) -> dict:
    """What identifies the student view of the teacher cache `manifest` for the tokenizer with this fingerprint:
    the teacher cache, the student tokenizer and the tokenization settings (the teacher cache's)."""
    return {"schema_version": SCHEMA_VERSION, "teacher_cache": manifest.fingerprint,
            "student_tokenizer": student_tokenizer, "tokenize": manifest.fingerprint_inputs.get("tokenize")}


def view_dir(cache_dir: Path, manifest: Manifest, student_tokenizer: str) -> Path:
    """Where the student view of this teacher cache for that tokenizer lives (whether or not it is built)."""
    return Path(cache_dir) / VIEWS_DIR / hash_json(view_inputs(manifest, student_tokenizer))[:12]


def view_command(cache_dir: Path, student_ref: str | None) -> str:
    """The command that builds a student view (`student_ref`: the --student-tokenizer argument, when known)."""
    return f"dskd align {cache_dir} --student-tokenizer {student_ref or '<the student tokenizer>'}"


class CacheReader:
    """Map-style access to cache rows across shards, memory-mapped, each shard's sha256 checked on first use.

    `student_tokenizer`: the fingerprint of the tokenizer the rows are read for. None, or the teacher's, reads the
    teacher's rows directly (the student ids are the teacher's); any other joins them with that tokenizer's student
    view (`student_ref` names the tokenizer in the error that says how to build a missing view)."""

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        student_tokenizer: str | None = None,
        student_ref: str | None = None,
        expect_fingerprint: str | None = None,
        verify: bool = True,
    ):
        self.dir = resolve_cache_dir(cache_dir)
        self.manifest = read_manifest(self.dir)
        m = self.manifest
        if expect_fingerprint is not None and m.fingerprint != expect_fingerprint:
            raise CacheError(f"{self.dir}: fingerprint {m.fingerprint[:12]} is not the expected {expect_fingerprint[:12]}")
        self.verify = verify
        self.channel_scale = np.load(self.dir / CHANNEL_SCALE_FILE) if m.hidden_encoding == "int8" else None
        self._tables: dict[tuple[bool, int], pa.Table] = {}
        self._starts = np.cumsum([0] + [s.rows for s in m.shards])
        self.view_dir: Path | None = None
        self.view: ViewManifest | None = None
        if student_tokenizer is not None and student_tokenizer != m.teacher_tokenizer_fingerprint:
            self.view_dir = view_dir(self.dir, m, student_tokenizer)
            if not (self.view_dir / MANIFEST).exists():
                raise CacheError(f"{self.dir}: no student view for tokenizer {student_tokenizer[:12]} (the teacher's "
                                 f"is {m.teacher_tokenizer_fingerprint[:12]}); build it with "
                                 f"`{view_command(self.dir, student_ref)}`")
            self.view = read_manifest(self.view_dir, ViewManifest)
            v = self.view
            if (v.teacher_fingerprint, v.student_tokenizer_fingerprint) != (m.fingerprint, student_tokenizer) \
                    or [s.rows for s in v.shards] != [s.rows for s in m.shards]:
                raise CacheError(f"{self.view_dir}: this view is not of {self.dir} for tokenizer "
                                 f"{student_tokenizer[:12]} (rows or fingerprints differ); remove it and rebuild it "
                                 f"with `{view_command(self.dir, student_ref)}`")

    @property
    def same_tokenizer(self) -> bool:
        """The student reads the teacher's token ids (no view, no alignment)."""
        return self.view is None

    @property
    def fingerprint(self) -> str:
        """What the rows read here are: the teacher cache's fingerprint, or its view's (which covers it)."""
        return self.view.fingerprint if self.view is not None else self.manifest.fingerprint

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _table(self, shard: int, view: bool = False) -> pa.Table:
        if (view, shard) not in self._tables:
            where, info = (self.view_dir, self.view.shards[shard]) if view else (self.dir, self.manifest.shards[shard])
            hint = _recover_hint(self.dir)
            path = where / info.file
            if not path.exists():
                raise CacheError(f"{path}: shard listed in the manifest is missing; {hint}")
            if path.stat().st_size != info.bytes:
                raise CacheError(f"{path}: {path.stat().st_size} bytes, the manifest says {info.bytes} (truncated or "
                                 f"replaced); {hint}")
            if self.verify and sha256_file(path) != info.sha256:
                raise CacheError(f"{path}: sha256 mismatch (shard corrupted or replaced); {hint}")
            table = _open_table(path)
            if table.num_rows != info.rows:
                raise CacheError(f"{path}: {table.num_rows} rows, manifest says {info.rows}")
            self._tables[(view, shard)] = table
        return self._tables[(view, shard)]

    def __getitem__(self, i: int) -> CacheRow:
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        t = self._table(shard)
        j = i - int(self._starts[shard])
        m = self.manifest

        def matrix(table: pa.Table, col: str, width: int) -> np.ndarray:
            flat = table[col][j].values.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape(-1, width)

        def vector(table: pa.Table, col: str) -> np.ndarray:
            return table[col][j].values.to_numpy(zero_copy_only=False)

        compact = m.hidden_encoding == "int8"
        row_id = t["id"][j].as_py()
        teacher_ids = t["teacher_ids"][j].values.to_numpy()
        teacher_start = t["teacher_response_start"][j].as_py()
        student: dict = {"student_ids": teacher_ids, "student_response_start": teacher_start}
        if self.view is not None:
            v = self._table(shard, view=True)
            if (found := v["id"][j].as_py()) != row_id:
                raise CacheError(f"{self.view_dir / self.view.shards[shard].file}: row {j} is {found!r}, the teacher "
                                 f"cache's is {row_id!r}; remove the view and rebuild it with "
                                 f"`{view_command(self.dir, None)}`")
            student = {"student_ids": v["student_ids"][j].values.to_numpy(),
                       "student_response_start": v["student_response_start"][j].as_py(),
                       "align_student": vector(v, "align_student"), "align_teacher": vector(v, "align_teacher"),
                       "align_label": vector(v, "align_label"), "align_ratio": v["align_ratio"][j].as_py(),
                       "chunks": matrix(v, "chunks", 4)}
        return CacheRow(
            id=row_id,
            teacher_ids=teacher_ids,
            teacher_response_start=teacher_start,
            hidden=decode_hidden(
                matrix(t, "hidden", m.hidden_size),
                vector(t, "hidden_scale") if compact else None,
                m.hidden_encoding,
                self.channel_scale,
            ),
            topk_ids=torch.from_numpy(matrix(t, "topk_ids", m.top_k).copy()),
            topk_logits=torch.from_numpy(matrix(t, "topk_logits", m.top_k).copy()),
            lse=torch.from_numpy(vector(t, "lse").copy()),
            target_logprob=torch.from_numpy(vector(t, "target_logprob").copy()),
            **student,
        )

    def load_head(self, device: torch.device | str = "cpu") -> OutputHead:
        """The teacher output head saved with the cache, checked against the manifest's sha256."""
        path = self.dir / HEAD_FILE
        if not path.exists() or (self.verify and sha256_file(path) != self.manifest.head_sha256):
            raise CacheError(f"{path}: missing or sha256 mismatch (head corrupted or replaced); "
                             f"{_recover_hint(self.dir)}")
        return OutputHead.load(path).to(device)

    def load_embeddings(self) -> torch.Tensor:
        """The teacher input embeddings (V_T, d_T), saved when the cache was built with `store_embeddings`."""
        from safetensors.torch import load_file

        path = self.dir / EMBEDDINGS_FILE
        if self.manifest.embeddings_sha256 is None:
            raise CacheError(f"{self.dir}: built without teacher input embeddings (set cache.store_embeddings: true)")
        if not path.exists() or (self.verify and sha256_file(path) != self.manifest.embeddings_sha256):
            raise CacheError(f"{path}: missing or sha256 mismatch (embeddings corrupted or replaced); "
                             f"{_recover_hint(self.dir)}")
        return load_file(str(path))["weight"]

    def vocab_map(self) -> np.ndarray:
        """(V_T,) int32 teacher id -> student id with the same text, -1 for none (read through a view)."""
        if self.view is None:
            raise CacheError(f"{self.dir}: read for the teacher's own tokenizer, so there is no vocabulary map (ids "
                             "are shared)")
        path = self.view_dir / VOCAB_MAP_FILE
        if not path.exists() or (self.verify and sha256_file(path) != self.view.vocab_map_sha256):
            raise CacheError(f"{path}: missing or sha256 mismatch; {_recover_hint(self.dir)}")
        return np.load(path)

    def table(self, shard: int, view: bool = False) -> pa.Table:
        """The whole (checked) Arrow table of one shard (of the view, `view`), for column-wise inspection."""
        return self._table(shard, view)

    def lengths(self) -> np.ndarray:
        """(rows,) student sequence lengths, read from the length column only (for length-grouped batching)."""
        view, col = (True, "student_ids") if self.view is not None else (False, "teacher_ids")
        parts = [pc.list_value_length(self._table(s, view)[col]).to_numpy() for s in range(len(self.manifest.shards))]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def ids(self) -> list[str]:
        return [x for s in range(len(self.manifest.shards)) for x in self._table(s)["id"].to_pylist()]
