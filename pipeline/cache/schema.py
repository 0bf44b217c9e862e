"""THE teacher-cache declaration: Arrow schemas, SCHEMA_VERSION, hidden-state encodings and the manifests.

A teacher cache belongs to the teacher: one row per example, teacher columns only, fingerprinted by the teacher, the
data, the teacher's tokenization settings and the storage settings, never by a student. A same-tokenizer student
reads it directly (its ids are the teacher's); each other student tokenizer reads it through a student view
(`views/<fingerprint[:12]>/` inside the cache directory, built by pipeline/cache/views.py without any model), whose shards
hold that tokenizer's side of the same rows in the same order.

Teacher shards: ids are stored whole; every per-position column covers exactly the teacher label positions that
predict a response token (response_start-1 .. len(ids)-2), in order:
- hidden: last-layer hidden state after the final norm, (n_resp, d), in the manifest's `hidden_encoding`:
  float32 / bfloat16 / float16 ("exact" mode: the teacher's compute dtype; bfloat16 is stored as its raw uint16
  bits since Arrow has no bfloat16), or int8 ("compact" mode: per-position absmax scaling, 1 byte per dimension
  plus one float32 `hidden_scale` per position)
- topk_ids / topk_logits: the k largest teacher logits, (n_resp, k), descending, always exact
- lse: log-sum-exp over the full vocabulary, (n_resp,), so the tail mass 1 - sum(softmax top-k) is known exactly
- target_logprob: (n_resp,) the teacher's log-probability of the token that actually follows (its own tokenization
  of the response), from the model's logits in stage 1 whether or not the head is exact: summed over a chunk, the
  teacher's likelihood of the chunk's text (alm)
View shards (one student tokenizer): id (checked against the teacher row's), student_ids, student_response_start,
and two alignments of the response, in label-position coordinates:
- align_student / align_teacher: (K,) student and teacher label positions whose next tokens cover the same text
- align_label: (K,) the student id of the teacher's top-1 prediction at that teacher position, its leading
  whitespace translated as the alignment trims it (`alignment.LabelMap`), -100 when no student token spells it
  (stage 2 must not train on it, never EOS/unk)
- align_ratio: K / number of student response labels
- chunks: (C, 4) [s_begin, s_end, t_begin, t_end) label-position ranges of `alignment.chunk_alignment`: runs of
  student and teacher positions predicting the same text, partitioning both responses (plus EOS as a 1:1 chunk)
Version 4 added target_logprob and chunks; version 5 translates align_label across leading whitespace; version 6
splits the student side into views. Readers refuse any other SCHEMA_VERSION instead of patching around it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from pipeline.versions import SCHEMA_VERSION  # noqa: F401  (declared where the quick checks read it without torch)

MANIFEST = "manifest.json"
PROGRESS = "_progress.json"
SHARD_PATTERN = "shard-{:05d}.arrow"
# in a cache root: the name of the cache directory (one per fingerprint) that the last stage-1 run finished
CURRENT = "CURRENT"
DATA_FILE = "data.jsonl"
# saved tokenizers: the teacher's beside its cache, a student's in its view
TEACHER_TOKENIZER, STUDENT_TOKENIZER = "teacher_tokenizer", "student_tokenizer"
EMBEDDINGS_FILE = "teacher_embeddings.safetensors"
VOCAB_MAP_FILE = "vocab_map.npy"
# a view's MinED map (objective mined), kept there by the first run that needs it, beside its sha256
MINED_MAP_FILE = "mined_map.npy"
# compact mode: per-channel RMS of the teacher's hidden states, fitted once on the first rows (see encode_hidden)
CHANNEL_SCALE_FILE = "hidden_channel_scale.npy"

_STORAGE = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16(), "int8": pa.int8()}
ALIGN_COLUMNS = ("align_student", "align_teacher", "align_label", "align_ratio")
# teacher shard schema metadata: the shard's StorageError (JSON), gathered into the manifest
STORAGE_META = b"dskd_storage_error"
# the student views of a teacher cache: views/<view fingerprint[:12]>/, each a manifest, shards, the student's
# tokenizer and the vocabulary map
VIEWS_DIR = "views"


def arrow_schema(hidden_size: int, top_k: int, hidden_encoding: str) -> pa.Schema:
    """A teacher shard's columns."""
    fields = [
        ("id", pa.string()),
        ("teacher_ids", pa.list_(pa.int32())),
        ("teacher_response_start", pa.int32()),
        ("hidden", pa.list_(pa.list_(_STORAGE[hidden_encoding], hidden_size))),
    ]
    if hidden_encoding == "int8":
        fields.append(("hidden_scale", pa.list_(pa.float32())))
    fields += [
        ("topk_ids", pa.list_(pa.list_(pa.int32(), top_k))),
        ("topk_logits", pa.list_(pa.list_(pa.float32(), top_k))),
        ("lse", pa.list_(pa.float32())),
        ("target_logprob", pa.list_(pa.float32())),
    ]
    return pa.schema(fields)


def view_schema() -> pa.Schema:
    """A student view shard's columns."""
    fields = [("id", pa.string()), ("student_ids", pa.list_(pa.int32())), ("student_response_start", pa.int32())]
    fields += [(c, pa.list_(pa.int32())) for c in ALIGN_COLUMNS[:3]] + [("align_ratio", pa.float32())]
    fields.append(("chunks", pa.list_(pa.list_(pa.int32(), 4))))
    return pa.schema(fields)


def list_column(rows: list[np.ndarray], typ: pa.DataType) -> pa.Array:
    """Arrow list column from per-row numpy arrays (1-D, or 2-D for list<fixed_size_list>) without Python loops
    over elements: one concatenation and an offsets vector."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    inner = typ.value_type
    flat = np.concatenate([np.asarray(r).reshape(-1) for r in rows]) if rows else np.zeros(0)
    if pa.types.is_fixed_size_list(inner):
        values = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=inner.value_type), inner.list_size)
    else:
        values = pa.array(flat, type=inner)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


# ---- hidden-state encodings


def fit_channel_scale(h: torch.Tensor) -> np.ndarray:
    """(d,) float32 per-channel RMS of sample hidden states (n, d). Dividing by it before the per-position absmax
    keeps a few large channels from flattening the rest to zero: about 9x lower KL on SmolLM2-135M."""
    rms = h.float().pow(2).mean(0).sqrt()
    return rms.clamp(min=1e-3 * float(rms.median().clamp(min=1e-12))).numpy().astype(np.float32)


def encode_hidden(
    h: torch.Tensor | np.ndarray, encoding: str, channel_scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(n, d) tensor -> (stored values, per-position scale or None) in the storage form of `encoding`.
    int8: q = round(h / c / s) with c the per-channel scale (optional) and s = absmax(h / c) / 127 per position.
    In numpy, single-threaded: stage 1 encodes in its writer thread, where torch's operators would start a second
    OpenMP team whose spinning threads take the cores from the teacher's forward (measured: compact mode's decoder
    10-15% slower). Rounding as torch's: to nearest, ties to even."""
    x = _float32(h)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused by the caller (`stored_finite`)
        if encoding == "int8":
            if channel_scale is not None:
                x = x / channel_scale
            absmax = np.abs(x).max(axis=-1, keepdims=True)
            scale = np.where(absmax > 0, absmax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
            q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
            return q, scale[:, 0]
        if encoding == "bfloat16":
            return _bfloat16_bits(x), None
        return np.ascontiguousarray(x.astype(np.dtype(encoding), copy=False)), None


def _float32(h: torch.Tensor | np.ndarray) -> np.ndarray:
    """A CPU tensor or array as float32 numpy, without a torch operator (bfloat16: its bits shifted, exact)."""
    if isinstance(h, np.ndarray):
        return h.astype(np.float32, copy=False)
    h = h.detach().cpu()
    if h.dtype == torch.bfloat16:
        return (h.view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return h.numpy().astype(np.float32, copy=False)


def float32_rows(parts: list[torch.Tensor]) -> np.ndarray:
    """(n, d) float32: the row blocks `parts` stacked, in numpy (stage 1's writer thread: no torch operator)."""
    return np.concatenate([_float32(x) for x in parts])


def stored_finite(values: np.ndarray, encoding: str) -> bool:
    """Whether every encoded value of a float16 / bfloat16 encoding is finite (int8 and float32 always are here)."""
    if encoding == "bfloat16":
        return bool(((values & np.uint16(0x7F80)) != np.uint16(0x7F80)).all())
    return bool(np.isfinite(values).all()) if encoding == "float16" else True


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16's bits (uint16), rounded to nearest even as torch's conversion (NaN: 0x7FC0)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    out = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    out[np.isnan(x)] = 0x7FC0
    return out


def decode_hidden(
    values: np.ndarray, scale: np.ndarray | None, encoding: str, channel_scale: np.ndarray | None = None
) -> torch.Tensor:
    """Inverse of `encode_hidden`: exact encodings come back in their dtype, int8 as float32 q * s * c."""
    if encoding == "int8":
        x = values.astype(np.float32) * scale.astype(np.float32)[:, None]
        return torch.from_numpy(x * channel_scale if channel_scale is not None else x)
    if encoding == "bfloat16":
        return torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(values))  # a copy: mapped Arrow buffers are read-only


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    response_tokens: int
    bytes: int
    sha256: str


class _ShardedManifest:
    """A manifest's JSON form: its fields, the shards as ShardInfo."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        return cls(**d)


@dataclass(frozen=True)
class Manifest(_ShardedManifest):
    schema_version: int
    # hash of `fingerprint_inputs`: teacher weights, its tokenizer, data content, template, lengths, k, dtypes, mode
    fingerprint: str
    fingerprint_inputs: dict
    teacher_name: str
    teacher_vocab_size: int
    hidden_size: int
    # "exact": hidden states in the teacher's compute dtype; "compact": int8 with a per-position scale
    mode: str
    hidden_encoding: str
    top_k: int
    # the saved head reproduces the teacher's logits from the exact hidden states (checked at build time); when
    # false, stage 2 must use the stored top-k + tail instead of recomputing logits
    head_exact: bool
    head_max_error: float
    # what storing the hidden states in `hidden_encoding` costs, measured while building (see `StorageError`):
    # the max |logit error| of the recomputed top-k (every position) and log-sum-exp, the KL(exact || recomputed),
    # and the largest |logit|; the one tolerance stage 2 and `cache verify` accept derives from it
    storage_error: dict
    # a student whose tokenizer has this fingerprint reads the rows directly; any other reads them through a view
    teacher_tokenizer_fingerprint: str
    # sha256 of the files saved once beside the shards: teacher head, and the input embeddings (null unless asked)
    head_sha256: str
    embeddings_sha256: str | None
    # processes that wrote the shards (the rows do not depend on it)
    world_size: int
    rows: int
    response_tokens: int
    shards: list[ShardInfo] = field(default_factory=list)
    # rows per origin: "gold" (a data set's own responses) or "rollout:<model>:round<r>" (generated; the cache's
    # data.jsonl names each row's)
    origins: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ViewManifest(_ShardedManifest):
    """A student view's manifest: the teacher cache it reads, the student tokenizer, its shards (the teacher cache's
    row ranges, one view shard per teacher shard)."""

    schema_version: int
    # hash of `fingerprint_inputs`: the teacher cache's fingerprint, the student tokenizer, the tokenization settings
    fingerprint: str
    fingerprint_inputs: dict
    teacher_fingerprint: str
    student_tokenizer_fingerprint: str
    vocab_map_sha256: str
    rows: int
    # student response labels
    response_tokens: int
    shards: list[ShardInfo] = field(default_factory=list)


# rounding of the head's own matmul output, relative to the largest logit: recomputing on another device or batch
# shape may differ by this much even from lossless hidden states (float32: summation order; half: one output ulp)
HEAD_ROUNDING = {"float32": 1e-6, "bfloat16": 2.0**-7, "float16": 2.0**-10}
# absolute floor of the tolerance (float32 summation order over d terms)
TOLERANCE_FLOOR = 1e-3


@dataclass
class StorageError:
    """Accumulates, over the positions of a build, how far logits recomputed from the stored (encoded, then
    decoded) hidden states are from the cached ones: top-k on every position, log-sum-exp and KL on a sample."""

    topk_max: float = 0.0
    lse_max: float = 0.0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    kl_positions: int = 0
    max_abs_logit: float = 0.0

    def merge(self, d: dict) -> None:
        self.topk_max, self.lse_max = max(self.topk_max, d["topk_max"]), max(self.lse_max, d["lse_max"])
        self.kl_sum, self.kl_max = self.kl_sum + d["kl_sum"], max(self.kl_max, d["kl_max"])
        self.kl_positions += d["kl_positions"]
        self.max_abs_logit = max(self.max_abs_logit, d["max_abs_logit"])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> dict:
        """What the manifest records."""
        return {"topk_max_error": self.topk_max, "lse_max_error": self.lse_max,
                "kl_mean": self.kl_sum / max(self.kl_positions, 1), "kl_max": self.kl_max,
                "kl_positions": self.kl_positions, "max_abs_logit": self.max_abs_logit}


def recompute_tolerance(manifest: Manifest, head_dtype: str) -> float:
    """THE largest |recomputed - cached| teacher logit (top-k and log-sum-exp) that stage 2 and `cache verify`
    accept, derived from how the cache was stored: twice the error measured on the stored hidden states while
    building (0 for lossless float32; bf16 rounding of a real model's hidden states moves logits by ~0.1), plus the
    rounding of the head's matmul in `head_dtype` at the largest logit, plus a float32 floor."""
    e = manifest.storage_error
    measured = max(e["topk_max_error"], e["lse_max_error"])
    return 2 * measured + HEAD_ROUNDING[head_dtype] * e["max_abs_logit"] + TOLERANCE_FLOOR
