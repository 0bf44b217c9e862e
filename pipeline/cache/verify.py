"""`dskd cache verify` and `dskd cache info`: fidelity of a finished cache, and what it holds.

verify re-derives the teacher logits from the stored hidden states and the saved head, and compares them with the
stored top-k (ids and values) and log-sum-exp. Its KL is between the stored and the recomputed distributions over
the same k+1 buckets (the k stored ids and the tail): a lower bound of the full-vocabulary KL, exact in the tail mass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
import yaml

from pipeline.cache.schema import recompute_tolerance
from pipeline.cache.store import CacheReader
from pipeline.losses import SparseLogits, divergence


@dataclass
class VerifyReport:
    cache: str
    rows: int
    positions: int
    head_exact: bool
    max_topk_error: float
    max_lse_error: float
    # the cached log-probability of the teacher's own next token (alm's chunk likelihoods) against the recomputed one
    max_target_logprob_error: float
    # fraction of positions whose recomputed argmax is the stored top-1, and mean overlap of the top-k id sets
    top1_agreement: float
    topk_overlap: float
    kl_mean: float
    kl_max: float
    tolerance: float
    ok: bool
    reason: str


def verify(path: str | Path, tolerance: float | None = None) -> VerifyReport:
    reader = CacheReader(path)  # every shard's sha256 is checked as it is read
    m = reader.manifest
    head = reader.load_head()
    # the tolerance stage 2 applies, derived from how the cache was stored
    tol = tolerance if tolerance is not None else recompute_tolerance(m, str(head.weight.dtype).removeprefix("torch."))
    err_topk = err_lse = err_target = kl_max = kl_sum = 0.0
    top1 = overlap = positions = 0
    for i in range(len(reader)):
        row = reader[i]
        z = head.logits(row.hidden)
        err_topk = max(err_topk, (z.gather(-1, row.topk_ids.long()) - row.topk_logits).abs().max().item())
        lse = torch.logsumexp(z, -1)
        err_lse = max(err_lse, (lse - row.lse).abs().max().item())
        targets = torch.from_numpy(row.teacher_ids[row.teacher_response_start :].astype(np.int64))
        own = z.gather(-1, targets[:, None])[:, 0] - lse
        err_target = max(err_target, (own - row.target_logprob).abs().max().item()) if len(own) else err_target
        ids = z.topk(m.top_k, dim=-1).indices
        top1 += int((ids[:, 0] == row.topk_ids[:, 0]).sum())
        overlap += float((ids[:, :, None] == row.topk_ids[:, None, :].long()).any(-1).float().mean(-1).sum())
        # KL(stored || recomputed) over the k stored ids + the tail bucket: the sparse form of the training loss
        # a KL is >= 0: float32 rounding of two nearly equal distributions can give -1e-5, which is 0
        kl = divergence("fkl", z, SparseLogits(row.topk_ids, row.topk_logits, row.lse, z.shape[-1]),
                        reduction="none").clamp(min=0)
        kl_sum, kl_max = kl_sum + kl.sum().item(), max(kl_max, kl.max().item())
        positions += z.shape[0]
    worst = max(err_topk, err_lse)
    if not m.head_exact:
        ok, reason = False, (
            f"the saved head does not reproduce the teacher (max error {m.head_max_error:.3g} when built, "
            f"{worst:.3g} now): this cache holds top-k + tail only for this teacher"
        )
    elif not worst <= tol:
        ok, reason = False, f"recomputed logits differ from the stored top-k by {worst:.3g} > {tol:g}"
    elif not err_target <= 2 * tol:  # a difference of two logits, each within tol
        ok, reason = False, f"recomputed next-token log-probabilities differ from the stored ones by {err_target:.3g} " \
                            f"> {2 * tol:g}"
    else:
        ok, reason = True, "ok"
    return VerifyReport(
        cache=str(reader.dir), rows=len(reader), positions=positions, head_exact=m.head_exact,
        max_topk_error=err_topk, max_lse_error=err_lse, max_target_logprob_error=err_target,
        top1_agreement=top1 / max(positions, 1), topk_overlap=overlap / max(positions, 1),
        kl_mean=kl_sum / max(positions, 1), kl_max=kl_max, tolerance=tol, ok=ok, reason=reason,
    )


def info(path: str | Path) -> dict:
    """What the cache holds: counts, bytes per response token by column, alignment ratios, names and settings."""
    reader = CacheReader(path)
    m = reader.manifest
    n_tok = max(m.response_tokens, 1)
    col_bytes: dict[str, int] = {}
    ratios = []
    student_labels = exact = usable = chunked = 0
    for s in range(len(m.shards)):
        table = reader.table(s)
        for name in table.column_names:
            col_bytes[name] = col_bytes.get(name, 0) + table.column(name).nbytes
        if "align_ratio" in table.column_names:
            ratios.append(table["align_ratio"].to_numpy())
            student_labels += int(pc.sum(pc.subtract(pc.list_value_length(table["student_ids"]),
                                                     table["student_response_start"])).as_py() or 0)
            exact += len(table["align_student"].combine_chunks().values)
            usable += int(np.count_nonzero(table["align_label"].combine_chunks().values.to_numpy() != -100))
            ranges = table["chunks"].combine_chunks().values.flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)
            chunked += int((ranges[:, 1] - ranges[:, 0]).sum())
    cfg = yaml.safe_load((reader.dir / "config.yaml").read_text())
    student_tok = cfg.get("student_tokenizer") or cfg.get("teacher_tokenizer") or cfg["teacher"]
    out = {
        "cache": str(reader.dir),
        "teacher": m.teacher_name,
        "teacher_model": cfg["teacher"]["path"],
        "student_tokenizer": student_tok["path"],
        "same_tokenizer": m.same_tokenizer,
        "data": cfg["data"]["path"],
        "rows": m.rows,
        "response_tokens": m.response_tokens,
        "shards": len(m.shards),
        "bytes": sum(s.bytes for s in m.shards),
        "bytes_per_response_token": sum(s.bytes for s in m.shards) / n_tok,
        "bytes_per_response_token_by_column": {k: v / n_tok for k, v in col_bytes.items()},
        "mode": m.mode,
        "hidden_encoding": m.hidden_encoding,
        "hidden_size": m.hidden_size,
        "teacher_vocab_size": m.teacher_vocab_size,
        "top_k": m.top_k,
        "head_exact": m.head_exact,
        "storage_error": m.storage_error,
        "tokenize": cfg.get("tokenize"),
        "fingerprint": m.fingerprint,
    }
    if ratios:
        r = np.concatenate(ratios)
        q = np.percentile(r, [0, 10, 50, 90, 100])
        out["alignment_ratio"] = {
            "mean": float(r.mean()), "min": float(q[0]), "p10": float(q[1]), "median": float(q[2]),
            "p90": float(q[3]), "max": float(q[4]),
        }
        # student response labels with a teacher signal: at exact-token pairs (mined, overlap_kd); at exact pairs
        # whose teacher top-1 has a student label (dskd_eta's three terms train only there); in chunks (alm, alm_eta)
        n = max(student_labels, 1)
        out["coverage"] = {"exact": exact / n, "exact_usable": usable / n, "chunks": chunked / n}
    return out


def report_dict(report: VerifyReport) -> dict:
    return asdict(report)
