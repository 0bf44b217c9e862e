"""Teacher logits recomputed from hidden states and the saved head equal the teacher's own logits.

Tolerances: float32 compute and storage -> 1e-5 absolute (the same matmul, reordered); hidden states stored in
bfloat16 from a float32 teacher -> 0.05 absolute on logits of magnitude ~1-10 (bf16 keeps 8 mantissa bits).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cache.schema import decode_hidden, encode_hidden, float32_rows, stored_finite
from pipeline.cache.teacher import check_head, every_hidden, teacher_forward
from pipeline.data.tokenize import response_positions
from pipeline.models.head import OutputHead
from tests.conftest import tiny_lm

V = 97


def tiny(kind: str):
    return tiny_lm(kind, layers=2, vocab=V)


SEQS = [[5, 6, 7, 8, 9, 10, 11, 1], [12, 13, 14, 15, 1], [20, 21, 22, 23, 24, 25, 26, 27, 28, 1]]
STARTS = [3, 2, 6]


@pytest.mark.parametrize("kind", ["llama", "qwen2-tied", "gemma3-softcap"])
def test_cached_hidden_reproduces_model_logits(kind):
    model = tiny(kind)
    head = OutputHead.from_model(model)
    rows = teacher_forward(model, head, SEQS, STARTS, top_k=8, pad_id=0)
    for seq, start, row in zip(SEQS, STARTS, rows):
        with torch.no_grad():  # the model's own forward on this sequence alone (no padding)
            own = model(torch.tensor([seq[:-1]])).logits[0, list(response_positions(len(seq), start))].float()
        assert row.hidden.shape == (len(seq) - start, 32)
        torch.testing.assert_close(head.logits(row.hidden), own, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(row.lse, torch.logsumexp(own, -1), atol=1e-5, rtol=1e-5)
        nxt = torch.tensor(seq[start:])  # the token each position actually predicts
        own_lp = torch.log_softmax(own.double(), -1).gather(-1, nxt[:, None])[:, 0].float()
        torch.testing.assert_close(row.target_logprob, own_lp, atol=1e-5, rtol=1e-5)
        vals, _ = own.topk(8, -1)
        torch.testing.assert_close(row.topk_logits, vals, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(own.gather(-1, row.topk_ids.long()), row.topk_logits, atol=1e-5, rtol=1e-5)
    assert check_head(model, head, SEQS, pad_id=0) < 1e-5


@pytest.mark.parametrize("keep,chunk", [(6, 4), (100, 0), (0, 0)])
def test_kept_logits_are_the_forwards_own(keep, chunk):
    """Stage 1's storage-error sample reads the logits the forward computed for the batch's first positions (across
    rows and chunks of positions) instead of computing them again: the same values, and only those positions."""
    model = tiny("llama")
    head = OutputHead.from_model(model)
    rows = teacher_forward(model, head, SEQS, STARTS, top_k=8, pad_id=0, keep_logits=keep, chunk_positions=chunk)
    left = keep
    for row in rows:
        n = min(left, row.hidden.shape[0])
        if n == 0:
            assert row.logits is None
            continue
        assert row.logits.shape == (n, V) and row.logits.dtype == torch.float32
        torch.testing.assert_close(row.logits, head.logits(row.hidden[:n]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.logsumexp(row.logits, -1), row.lse[:n])
        left -= n


def test_every_hidden_is_the_forwards_hidden_at_every_position():
    """int8's channel-scale fit reads the decoder alone: the same hidden states teacher_forward keeps when every
    position is a response position."""
    model = tiny("llama")
    rows = teacher_forward(model, OutputHead.from_model(model), SEQS, [1] * len(SEQS), top_k=1, pad_id=0)
    assert torch.equal(every_hidden(model, SEQS, pad_id=0), torch.cat([r.hidden for r in rows]))


def test_softcap_is_part_of_the_head():
    head = OutputHead.from_model(tiny("gemma3-softcap"))
    assert head.final_logit_softcapping == 5.0
    assert head.logits(torch.randn(4, 32) * 100).abs().max() <= 5.0


def test_bfloat16_storage_tolerance():
    model = tiny("llama")
    head = OutputHead.from_model(model)
    (row,) = teacher_forward(model, head, SEQS[:1], STARTS[:1], top_k=4, pad_id=0)
    stored = decode_hidden(*encode_hidden(row.hidden, "bfloat16"), "bfloat16")
    assert stored.dtype == torch.bfloat16
    err = (head.logits(stored.float()) - head.logits(row.hidden)).abs().max().item()
    assert 0 < err < 0.05


def test_int8_encoding_error_is_bounded_by_half_a_step():
    h = torch.randn(50, 64, dtype=torch.float64).float() * torch.logspace(-2, 2, 50)[:, None]
    h[3] = 0  # an all-zero row must not divide by zero
    values, scale = encode_hidden(h, "int8")
    assert values.dtype.name == "int8" and scale.shape == (50,)
    back = decode_hidden(values, scale, "int8")
    step = h.abs().amax(-1, keepdim=True) / 127
    assert ((back - h).abs() <= step / 2 + 1e-7 * h.abs()).all() and back[3].eq(0).all()


def test_encodings_are_byte_for_byte_torchs_rounding():
    """The writer thread encodes in numpy (no second OpenMP team beside the forward): the stored bytes are those of
    torch's conversions and rounding (caches built before stay identical), across magnitudes, exact int8 ties,
    zero rows, subnormals, float16 / bfloat16 overflow; and `stored_finite` finds what overflowed."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, 96, generator=g) * 10 ** torch.empty(64, 1).uniform_(-8, 6, generator=g)
    h[0] = 0
    h[1] = torch.arange(96).float() - 48.5  # absmax 48.5: halves of a step are ties
    h[2, :5] = torch.tensor([65504.0, 65520.0, 3.4e38, -1e-40, 1e-45])
    c = (torch.rand(96, generator=g) + 0.1).numpy()

    def torch_encoding(x, encoding, scale_c):
        if encoding == "int8":
            x = x / torch.from_numpy(scale_c) if scale_c is not None else x
            absmax = x.abs().amax(dim=-1, keepdim=True)
            step = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
            return torch.round(x / step).clamp_(-127, 127).to(torch.int8).numpy(), step.squeeze(-1).numpy()
        if encoding == "bfloat16":
            return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
        return x.to(getattr(torch, encoding)).numpy(), None

    for encoding, scale_c, rows in [("int8", None, slice(0, 2)), ("int8", c, slice(0, 2)), ("int8", None, slice(3, None)),
                                    ("int8", c, slice(3, None)), ("bfloat16", None, slice(None)),
                                    ("float16", None, slice(None)), ("float32", None, slice(None))]:
        got, want = encode_hidden(h[rows], encoding, scale_c), torch_encoding(h[rows], encoding, scale_c)
        assert got[0].dtype == want[0].dtype and got[0].tobytes() == want[0].tobytes(), encoding
        assert (got[1] is None) == (want[1] is None) and (got[1] is None or got[1].tobytes() == want[1].tobytes())
        assert stored_finite(got[0], encoding) == (encoding in ("int8", "float32") or rows != slice(None))
    assert stored_finite(encode_hidden(h[3:], "bfloat16")[0], "bfloat16")
    # a bfloat16 or float16 teacher's hidden states (a GPU teacher's) widen exactly, without a torch operator
    for dtype in (torch.bfloat16, torch.float16):
        low = h[3:].to(dtype)
        assert float32_rows([low[:5], low[5:]]).tobytes() == low.float().numpy().tobytes()
    h[3, 0] = float("nan")  # its bits are not compared (torch's vary with the kernel), only refused
    assert not stored_finite(encode_hidden(h[3:], "bfloat16")[0], "bfloat16")
    assert not stored_finite(encode_hidden(h[3:], "float16")[0], "float16")


def test_model_logits_path_when_the_head_is_not_trusted():
    model = tiny("gemma3-softcap")
    head = OutputHead.from_model(model)
    exact = teacher_forward(model, head, SEQS, STARTS, top_k=5, pad_id=0)
    own = teacher_forward(model, head, SEQS, STARTS, top_k=5, pad_id=0, head_exact=False)
    for a, b in zip(exact, own):
        assert torch.equal(a.topk_ids, b.topk_ids)
        torch.testing.assert_close(a.lse, b.lse, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=1e-5)


def test_head_round_trips_through_safetensors(tmp_path):
    head = OutputHead.from_model(tiny("gemma3-softcap"))
    back = OutputHead.load(head.save(tmp_path / "h.safetensors"))
    assert torch.equal(back.weight, head.weight) and back.final_logit_softcapping == 5.0
    x = torch.randn(3, 32)
    torch.testing.assert_close(back.logits(x), head.logits(x))
