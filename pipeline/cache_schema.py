"""THE teacher-cache declaration: Arrow schema, SCHEMA_VERSION and the manifest.

One row per example. Token ids are stored whole for student and teacher; every per-position teacher column covers
exactly the teacher label positions that predict a response token (response_start-1 .. len(ids)-2), in order:
- hidden: last-layer hidden state after the final norm, (n_resp, d) in `hidden_dtype`
  (bfloat16 is stored as its raw uint16 bits, since Arrow has no bfloat16)
- topk_ids / topk_logits: the k largest teacher logits, (n_resp, k), descending
- lse: log-sum-exp over the full vocabulary, (n_resp,), so the tail mass 1 - sum(softmax top-k) is known exactly
Readers refuse any other SCHEMA_VERSION instead of patching around it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "_progress.json"
SHARD_PATTERN = "shard-{:05d}.arrow"

_STORAGE = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}


def arrow_schema(hidden_size: int, top_k: int, hidden_dtype: str) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("student_ids", pa.list_(pa.int32())),
            ("student_response_start", pa.int32()),
            ("teacher_ids", pa.list_(pa.int32())),
            ("teacher_response_start", pa.int32()),
            ("hidden", pa.list_(pa.list_(_STORAGE[hidden_dtype], hidden_size))),
            ("topk_ids", pa.list_(pa.list_(pa.int32(), top_k))),
            ("topk_logits", pa.list_(pa.list_(pa.float32(), top_k))),
            ("lse", pa.list_(pa.float32())),
        ]
    )


def hidden_to_numpy(h: torch.Tensor, hidden_dtype: str) -> np.ndarray:
    """(n, d) tensor -> numpy in the storage encoding of `hidden_dtype`."""
    if hidden_dtype == "bfloat16":
        return h.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return h.to(getattr(torch, hidden_dtype)).contiguous().numpy()


def hidden_from_numpy(a: np.ndarray, hidden_dtype: str) -> torch.Tensor:
    if hidden_dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))  # a copy: mapped Arrow buffers are read-only


@dataclass(frozen=True)
class ShardInfo:
    file: str
    rows: int
    response_tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    # hash of `fingerprint_inputs`: teacher weights, both tokenizers, data content, template, lengths, k, dtypes
    fingerprint: str
    fingerprint_inputs: dict
    teacher_name: str
    teacher_vocab_size: int
    hidden_size: int
    hidden_dtype: str
    top_k: int
    # the student and teacher tokenizers encode identically (same ids): same-vocabulary objectives apply
    same_tokenizer: bool
    student_tokenizer_fingerprint: str
    teacher_tokenizer_fingerprint: str
    # sha256 of the teacher head file saved beside the shards
    head_sha256: str
    rows: int
    response_tokens: int
    shards: list[ShardInfo] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        return cls(**d)
