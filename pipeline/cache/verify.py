"""`dskd cache verify` and `dskd cache info`: fidelity of a finished cache, and what it holds.

verify re-derives the teacher logits from the stored hidden states and the saved head, and compares them with the
stored top-k (ids and values) and log-sum-exp. Its KL is between the stored and the recomputed distributions over
the same k+1 buckets (the k stored ids and the tail): a lower bound of the full-vocabulary KL, exact in the tail mass.
Each student view beside the cache is read whole: its shards' sha256, its vocabulary map's, every row's id against
the teacher row's, and its pairs inside both responses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
import yaml

from pipeline.cache.schema import MANIFEST, STUDENT_TOKENIZER, ViewManifest, recompute_tolerance
from pipeline.cache.store import CacheError, CacheReader, read_manifest
from pipeline.cache.views import view_dirs
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
    # per student view: {"view", "student_tokenizer", "rows", "ok", "reason"}
    views: list = None


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
    views = [verify_view(reader, d) for d in view_dirs(reader.dir)]
    bad = [v for v in views if not v["ok"]]
    if ok and bad:
        ok, reason = False, f"student view {bad[0]['view']}: {bad[0]['reason']}"
    return VerifyReport(
        cache=str(reader.dir), rows=len(reader), positions=positions, head_exact=m.head_exact,
        max_topk_error=err_topk, max_lse_error=err_lse, max_target_logprob_error=err_target,
        top1_agreement=top1 / max(positions, 1), topk_overlap=overlap / max(positions, 1),
        kl_mean=kl_sum / max(positions, 1), kl_max=kl_max, tolerance=tol, ok=ok, reason=reason, views=views,
    )


def verify_view(teacher: CacheReader, d: Path) -> dict:
    """One student view read whole through a reader of the teacher cache: manifest, shards (sha256), vocabulary map,
    each row's id against the teacher's, each pair and chunk inside both responses."""
    out = {"view": str(d), "student_tokenizer": None, "rows": 0, "ok": False, "reason": ""}
    try:
        v = read_manifest(d, ViewManifest)
        out["student_tokenizer"] = v.student_tokenizer_fingerprint
        reader = CacheReader(teacher.dir, student_tokenizer=v.student_tokenizer_fingerprint)
        if reader.view_dir != d:
            raise CacheError(f"{d}: not where this cache's view for its tokenizer lives ({reader.view_dir.name}); "
                             "the cache changed since it was built: remove it")
        reader.vocab_map()
        for i in range(len(reader)):
            row = reader[i]
            n_s = len(row.student_ids) - row.student_response_start
            n_t = len(row.lse)
            s_lo, t_lo = row.student_response_start - 1, row.teacher_response_start - 1
            inside = ((row.align_student >= s_lo) & (row.align_student < s_lo + n_s)).all() and \
                ((row.align_teacher >= t_lo) & (row.align_teacher < t_lo + n_t)).all()
            if not inside:
                raise CacheError(f"{d}: row {i} ({row.id!r}) has pairs outside the responses")
        out["rows"] = len(reader)
    except CacheError as e:
        out["reason"] = str(e)
        return out
    if not (d / STUDENT_TOKENIZER / "tokenizer.json").is_file():
        out["reason"] = f"{d / STUDENT_TOKENIZER}: missing"
        return out
    out["ok"], out["reason"] = True, "ok"
    return out


def info(path: str | Path) -> dict:
    """What the cache holds: counts, bytes per response token by column, alignment ratios, names and settings."""
    reader = CacheReader(path)
    m = reader.manifest
    n_tok = max(m.response_tokens, 1)
    col_bytes: dict[str, int] = {}
    for s in range(len(m.shards)):
        table = reader.table(s)
        for name in table.column_names:
            col_bytes[name] = col_bytes.get(name, 0) + table.column(name).nbytes
    cfg = yaml.safe_load((reader.dir / "config.yaml").read_text())
    out = {
        "cache": str(reader.dir),
        "teacher": m.teacher_name,
        "teacher_model": cfg["teacher"]["path"],
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
        "views": [view_info(reader, d) for d in view_dirs(reader.dir) if (d / MANIFEST).is_file()],
    }
    return out


def view_info(teacher: CacheReader, d: Path) -> dict:
    """One student view: its tokenizer, size, alignment ratios and how much of the student's response has a teacher
    signal."""
    v = read_manifest(d, ViewManifest)
    reader = CacheReader(teacher.dir, student_tokenizer=v.student_tokenizer_fingerprint)
    ratios = []
    student_labels = exact = usable = chunked = 0
    for s in range(len(v.shards)):
        table = reader.table(s, view=True)
        if table.num_rows:
            ratios.append(table["align_ratio"].to_numpy())
            student_labels += int(pc.sum(pc.subtract(pc.list_value_length(table["student_ids"]),
                                                     table["student_response_start"])).as_py() or 0)
            exact += len(table["align_student"].combine_chunks().values)
            usable += int(np.count_nonzero(table["align_label"].combine_chunks().values.to_numpy() != -100))
            ranges = table["chunks"].combine_chunks().values.flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)
            chunked += int((ranges[:, 1] - ranges[:, 0]).sum())
    out = {"view": str(d), "student_tokenizer_fingerprint": v.student_tokenizer_fingerprint,
           "rows": v.rows,
           "student_response_tokens": v.response_tokens, "bytes": sum(s.bytes for s in v.shards),
           "fingerprint": v.fingerprint}
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
