"""Batched teacher forward -> hidden states, top-k logits and log-sum-exp at response positions.

The decoder runs once per batch (`model.base_model`, whose output is the last hidden state after the final norm);
the output head is applied only at the label positions that predict a response token, through `OutputHead`,
the same function stage 2 uses to recompute logits. `check_head` proves on real batches that this equals the
model's own forward, so a cache is never built for a head that the stored weights cannot reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.cache.store import CacheRow
from pipeline.data.alignment import aligned_labels, encode_pair, tokenizer_label_map
from pipeline.data.tokenize import pad, response_positions, special_ids
from pipeline.losses import auto_chunk_positions
from pipeline.models.head import OutputHead
from pipeline.models.load import decoder_hidden, tokenizer_fingerprint


def stage1_chunk_positions(vocab_size: int) -> int:
    """Positions per chunk of stage 1's vocabulary-sized logits: stage 2's automatic size (64 MB of float32; no
    backward here, so only a few such tensors live at once). Smaller chunks stream the head from memory once per
    chunk: at 262k, 16-position chunks made Gemma-3's stage 1 a third slower."""
    return auto_chunk_positions(vocab_size)


@dataclass
class TeacherRow:
    hidden: torch.Tensor  # (n_resp, d), compute dtype
    topk_ids: torch.Tensor  # (n_resp, k) int32
    topk_logits: torch.Tensor  # (n_resp, k) float32
    lse: torch.Tensor  # (n_resp,) float32
    target_logprob: torch.Tensor  # (n_resp,) float32 log-probability of the actual next token (the sequence's own)
    # (m, V) float32 logits of this row's first m positions on the teacher's device, when `teacher_forward` was asked
    # to keep them (stage 1's storage-error sample: measured against them instead of computing them again)
    logits: torch.Tensor | None = None


def _hidden(model, seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, mask = pad([s[:-1] for s in seqs], pad_id)
    device = next(model.parameters()).device
    h = decoder_hidden(model, ids.to(device), mask.to(device))
    return h, ids, mask


def _top_k_and_lse(logits_fn, flat: torch.Tensor, targets: torch.Tensor, k: int, chunk_positions: int,
                   keep: int = 0):
    """(top-k logits, top-k ids, log-sum-exp, log-probability of `targets`, the float32 logits of the first `keep`
    positions) at each of the positions of `flat`."""
    ids_out, vals_out, lse_out, tgt_out, kept = [], [], [], [], []
    # chunks of positions bound the (positions, vocab) float32 logits in memory
    for part, tgt in zip(flat.split(chunk_positions), targets.split(chunk_positions)):
        z = logits_fn(part)
        if keep > 0:
            kept.append(z[:keep].float().clone())  # on z's device: the storage error reads them there
            keep -= len(kept[-1])
        lse = torch.logsumexp(z, dim=-1)
        lse_out.append(lse)
        tgt_out.append(z.gather(-1, tgt.to(z.device).long()[:, None])[:, 0] - lse)
        vals, idx = z.topk(k, dim=-1)
        vals_out.append(vals)
        ids_out.append(idx.to(torch.int32))
    return torch.cat(vals_out), torch.cat(ids_out), torch.cat(lse_out), torch.cat(tgt_out), kept


@torch.no_grad()
def every_hidden(model, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """(positions, d) the decoder's last hidden states at every position but the last of each sequence: what
    `teacher_forward` keeps with response starts of 1, without applying the head anywhere (int8's channel-scale fit,
    which needs no logits)."""
    h, _, _ = _hidden(model, seqs, pad_id)
    return torch.cat([h[b, : len(s) - 1] for b, s in enumerate(seqs)]).cpu()


@torch.no_grad()
def teacher_forward(
    model,
    head: OutputHead,
    seqs: list[list[int]],
    response_starts: list[int],
    top_k: int,
    pad_id: int,
    *,
    head_exact: bool = True,
    chunk_positions: int = 0,
    keep_logits: int = 0,
) -> list[TeacherRow]:
    """Run the teacher on full sequences `seqs` (prompt + response + EOS) and keep what the cache stores.

    With `head_exact` (the head reproduces the model, see `check_head`) one decoder pass runs and the head is applied
    at response positions only. Otherwise the model's own full forward gives the logits (top-k and lse stay exact
    for a head the cache cannot reproduce) and its last hidden state is kept beside them. `keep_logits`: the full
    logits of the batch's first that many response positions are also kept (`TeacherRow.logits`)."""
    k = min(top_k, head.vocab_size)
    chunk_positions = chunk_positions or stage1_chunk_positions(head.vocab_size)
    spans = [response_positions(len(s), rs) for s, rs in zip(seqs, response_starts)]
    targets = torch.tensor([t for s, rs in zip(seqs, response_starts) for t in s[rs:]], dtype=torch.long)
    if head_exact:
        h, _, _ = _hidden(model, seqs, pad_id)
        picked = [h[b, span] for b, span in enumerate(spans)]
        topv, topi, lse, tgt, kept = _top_k_and_lse(head.logits, torch.cat(picked), targets, k, chunk_positions,
                                                    keep_logits)
    else:
        ids, mask = pad([s[:-1] for s in seqs], pad_id)
        device = next(model.parameters()).device
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        picked = [out.hidden_states[-1][b, span] for b, span in enumerate(spans)]
        z = torch.cat([out.logits[b, span] for b, span in enumerate(spans)]).float()
        topv, topi, lse, tgt, kept = _top_k_and_lse(lambda part: part, z, targets, k, chunk_positions, keep_logits)
    rows, start = [], 0
    topv, topi, lse, tgt = topv.cpu(), topi.cpu(), lse.cpu(), tgt.cpu()
    kept = torch.cat(kept) if kept else None
    for p in picked:
        part = slice(start, start + p.shape[0])
        own = kept[part] if kept is not None and start < len(kept) else None
        rows.append(TeacherRow(p.cpu(), topi[part], topv[part], lse[part], tgt[part], own))
        start += p.shape[0]
    return rows


# the head check compares at most this many leading positions of each row: enough to tell a wrong head, and the
# model's own (positions x vocabulary) logits stay small at a 262k vocabulary
HEAD_CHECK_POSITIONS = 64


@torch.no_grad()
def check_head(model, head: OutputHead, seqs: list[list[int]], pad_id: int) -> float:
    """Max |head(hidden) - model logits| over the first HEAD_CHECK_POSITIONS positions of `seqs` (real positions
    only), in batches whose (rows x positions x V) logits stay within about 64 MB at any vocabulary."""
    rows = [s[:HEAD_CHECK_POSITIONS] for s in seqs]
    per_batch = max(1, (1 << 24) // (HEAD_CHECK_POSITIONS * head.vocab_size))
    device = next(model.parameters()).device
    worst = 0.0
    for b in range(0, len(rows), per_batch):
        ids, mask = pad(rows[b : b + per_batch], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        keep = mask.bool()
        h = decoder_hidden(model, ids, mask)[keep]
        own = model(input_ids=ids, attention_mask=mask).logits[keep].float()
        worst = max(worst, (head.logits(h) - own).abs().max().item())
        del own
    return worst


class OnlineTeacher:
    """The teacher resident in memory, producing now the rows a cache would hold (same tokenization, alignment,
    head and top-k), for online distillation and for checking that a cache reproduces it. Hidden states stay in
    the model's dtype; nothing is encoded or written."""

    def __init__(self, model, teacher_tok, student_tok, tok_cfg, top_k: int):

        self.model, self.teacher_tok, self.tok_cfg = model, teacher_tok, tok_cfg
        same = student_tok is None or tokenizer_fingerprint(student_tok) == tokenizer_fingerprint(teacher_tok)
        self.student_tok = None if same else student_tok
        self.head = OutputHead.from_model(model)
        self.top_k = min(top_k, self.head.vocab_size)
        self.pad_id = special_ids(teacher_tok, require_eos=False)[1]
        self.label_map = None if same else tokenizer_label_map(teacher_tok, student_tok)

    def rows(self, examples) -> list:
        """`store.CacheRow` for each example (prompt/response), in order."""

        enc = [encode_pair(e, self.teacher_tok, self.student_tok, self.tok_cfg) for e in examples]
        out = teacher_forward(self.model, self.head, [t.ids for t, _, _ in enc], [t.response_start for t, _, _ in enc],
                              self.top_k, self.pad_id)
        rows = []
        for e, (t, s, al), r in zip(examples, enc, out):
            kw = {}
            if al is not None:
                kw = dict(align_student=al.pairs[:, 0], align_teacher=al.pairs[:, 1],
                          align_label=aligned_labels(r.topk_ids[:, 0].numpy(), al.pairs, t, s, self.label_map),
                          align_ratio=len(al.pairs) / s.n_response, chunks=al.chunks)
            rows.append(CacheRow(e.id, np.asarray(s.ids, np.int32), s.response_start, np.asarray(t.ids, np.int32),
                                 t.response_start, r.hidden, r.topk_ids, r.topk_logits, r.lse, r.target_logprob, **kw))
        return rows
