"""The fused chunks of positions (pipeline/objectives/chunks.py) on a small head, against the unchunked
computation: values and every gradient, each chunk's forward run once, hints that decide speed but never the
gradient, kept-apart terms, a frozen or tied head, and spans that never split a group."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pipeline.objectives import chunks
from pipeline.objectives.chunks import chunked, pieces, whole_groups


@pytest.fixture
def calls(monkeypatch):
    """Every chunk forward, as (fn, span): a span's forward runs once unless a recomputation was asked for."""
    seen = []
    real = chunks._call

    def counted(fn, head, rows, span):
        seen.append((fn, span))
        return real(fn, head, rows, span)

    monkeypatch.setattr(chunks, "_call", counted)
    return seen


def twice(seen: list) -> list:
    keys = [(id(fn), span) for fn, span in seen]
    return [k for k in set(keys) if keys.count(k) > 1]


def setup(n=23, d=5, v=11, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(d, v, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g, dtype=torch.float64))
    h = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    return head, h, x, y


def fn(head, h, x, y):
    """Two differentiable terms through one head (one of them through a stop-gradient side), and two statistics."""
    z, zx = head(h), head(x)
    return {"a": F.cross_entropy(z, y, reduction="sum"),
            "b": (zx.detach().softmax(-1) * (zx.detach().log_softmax(-1) - z.log_softmax(-1))).sum()
            + (zx.log_softmax(-1).gather(-1, y[:, None])).sum(),
            "hits": (z.argmax(-1) == y).sum().double(),
            "max_z": z.max()}


def grads_of(loss, tensors, **kw):
    got = torch.autograd.grad(loss, tensors, allow_unused=True, **kw)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, got)]


@pytest.mark.parametrize("hints,loss_of", [
    ({"a": 0.3, "b": 0.7}, lambda t: 2.5 * (0.3 * t["a"] + 0.7 * t["b"])),  # the hints, up to a common factor
    ({"a": 0.3, "b": None}, lambda t: 0.3 * t["a"] - 1.7 * t["b"]),  # b kept apart: any weight
    ({}, lambda t: 0.3 * t["a"] + 0.7 * t["b"]),  # no hints: every term kept apart
])
def test_fused_equals_unchunked_and_runs_each_chunk_once(calls, hints, loss_of):
    head, h, x, y = setup()
    inputs = [h, x, head.weight, head.bias]
    whole = fn(head, h, x, y)
    want = grads_of(loss_of(whole), inputs)
    calls.clear()
    got = chunked(fn, len(y), 5, h, x, y, head=head, hints=hints)
    assert [s for _, s in calls] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    for k in whole:
        torch.testing.assert_close(got[k], whole[k], rtol=1e-12, atol=1e-12)
    assert not got["hits"].requires_grad and not got["max_z"].requires_grad
    for w, g in zip(want, grads_of(loss_of(got), inputs)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    assert not twice(calls), "a chunk ran its forward twice"


@pytest.mark.parametrize("from_malloc", [False, True], ids=["torch", "malloc"])
def test_what_the_chunks_sum_keeps_no_graph_and_a_large_buffer_comes_from_malloc(monkeypatch, from_malloc):
    """The summed gradients are plain tensors: a product recorded on a chunk's row inputs would keep each chunk's
    logits' gradient alive until the backward (what fused chunks exist to avoid). With every buffer taken from
    malloc (`chunks.buffer`, the large ones' path), the gradients are still the unchunked ones."""
    monkeypatch.setattr(chunks, "MALLOC_BYTES", 0 if from_malloc else chunks.MALLOC_BYTES)
    shapes = []
    real_empty = chunks.np.empty
    monkeypatch.setattr(chunks.np, "empty", lambda shape, **k: shapes.append(tuple(shape)) or real_empty(shape, **k))
    head, h, x, y = setup(n=300, v=13)  # chunks of 150 rows: each folded into the weight gradient at once
    inputs = [h, x, head.weight, head.bias]
    whole = fn(head, h, x, y)
    want = grads_of(0.3 * whole["a"] + 0.7 * whole["b"], inputs)
    got = chunked(fn, len(y), 150, h, x, y, head=head, hints={"a": 0.3, "b": 0.7})
    stored = got["a"].grad_fn.run.stored
    assert all(t is None or (not t.requires_grad and t.grad_fn is None) for t in stored)
    assert (tuple(head.weight.shape) in shapes) == from_malloc and stored[2].shape == head.weight.shape
    for w, g in zip(want, grads_of(0.3 * got["a"] + 0.7 * got["b"], inputs)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


def test_a_loss_other_than_the_hints_recomputes_and_is_still_exact(calls):
    """The per-term gradient diagnostics ask for one term at a time: the chunks run again with those weights, and
    from the second request on with every term kept apart, so a node serves any number of requests with two
    recomputations (a training step's one backward, with right hints, has none)."""
    head, h, x, y = setup()
    inputs = [h, x, head.weight, head.bias]
    got = chunked(fn, len(y), 5, h, x, y, head=head, hints={"a": 0.3, "b": 0.7})
    whole = fn(head, h, x, y)
    for term, recomputed in (("a", 5), ("b", 5), ("a", 0)):
        calls.clear()
        for w, g in zip(grads_of(whole[term], inputs, retain_graph=True), grads_of(got[term], inputs, retain_graph=True)):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
        # the first request recomputes with its weights, the second keeps every term's own gradients, which serve
        # every later request
        assert len(calls) == recomputed, term
    calls.clear()
    for w, g in zip(grads_of(0.6 * whole["a"] - 1.4 * whole["b"], inputs),
                    grads_of(0.6 * got["a"] - 1.4 * got["b"], inputs)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    assert not calls


def test_a_frozen_head_keeps_no_weight_gradient_and_a_tied_one_sends_none_through_the_rest():
    head, h, x, y = setup(bias=False)
    head.weight.requires_grad_(False)
    got = chunked(fn, len(y), 4, h, x, y, head=head, hints={"a": 1.0, "b": 1.0})
    (got["a"] + got["b"]).backward()
    assert head.weight.grad is None and h.grad is not None
    # a head tied to an embedding: the head's share arrives once, through the fused node, beside the embedding's
    head, h, x, y = setup(bias=False)
    emb = head.weight
    ids = torch.randint(0, 11, (23,))
    whole = fn(head, h + emb[ids], x, y)
    want = grads_of(whole["a"] + whole["b"], [emb])[0]
    got = chunked(fn, len(y), 4, h + emb[ids], x, y, head=head, hints={"a": 1.0, "b": 1.0})
    torch.testing.assert_close(grads_of(got["a"] + got["b"], [emb])[0], want, rtol=1e-6, atol=1e-9)


def test_without_autograd_or_with_one_chunk_nothing_is_fused(calls):
    head, h, x, y = setup()
    with torch.no_grad():
        out = chunked(fn, len(y), 5, h, x, y, head=head)
    assert len(calls) == 5 and not out["a"].requires_grad
    calls.clear()
    out = chunked(fn, len(y), 100, h, x, y, head=head)
    assert len(calls) == 1 and out["a"].grad_fn is not None and "Fused" not in type(out["a"].grad_fn).__name__


def test_spans_cover_the_rows_and_never_split_a_group():
    assert pieces(10, 4) == [(0, 4), (4, 8), (8, 10)]
    group = torch.tensor([0, 0, 0, 1, 1, -1, 2, 2, 2, 2, 3])
    assert torch.nonzero(whole_groups(group))[:, 0].tolist() == [0, 3, 5, 6, 10]
    assert pieces(11, 4, whole_groups(group)) == [(0, 3), (3, 6), (6, 10), (10, 11)]
    assert pieces(11, 2, whole_groups(group)) == [(0, 3), (3, 5), (5, 6), (6, 10), (10, 11)]  # a group longer than 2
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        group = torch.tensor([rng.choice([-1, *range(6)]) for _ in range(n)])  # any order, not only runs
        spans = pieces(n, rng.randint(1, 8), whole_groups(group))
        assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        for gid in set(group.tolist()) - {-1}:
            where = torch.nonzero(group == gid)[:, 0]
            assert len({i for i, (s, e) in enumerate(spans) for r in where.tolist() if s <= r < e}) == 1


def test_a_common_factor_within_float32_rounding_of_one_is_one():
    """The hinted weights arrive through the loss's float32 arithmetic a few units in the last place off: such a
    factor is exactly 1 (the stored gradients are handed out unscaled), a real one (an accumulation's) is kept."""
    run = chunks._Run(fn, (), [], [], None, {})
    run.known = {"a": 0.25, "b": 0.5}
    off = float(torch.tensor(0.5, dtype=torch.float32) * (1 + 2**-23)) / 0.5
    assert run._scale({"a": torch.tensor(0.25 * off), "b": torch.tensor(0.5 * off)}) == 1.0
    assert run._scale({"a": torch.tensor(0.125), "b": torch.tensor(0.25)}) == 0.5
    assert run._scale({"a": torch.tensor(0.25), "b": torch.tensor(0.25)}) is None  # not proportional


def masked_fn(head, h, x, y):
    """fn's terms and "m": a divergence through head(h) alone, on the rows where head(x)'s argmax is the label
    (the DSKD family's agreement-masked term), whose weight is known only after every chunk."""
    z, zx = head(h), head(x)
    agree = zx.detach().argmax(-1) == y
    per = (zx.detach().softmax(-1) * (zx.detach().log_softmax(-1) - z.log_softmax(-1))).sum(-1)
    return {**fn(head, h, x, y), "m": (per * agree).sum(), "n": agree.sum().double()}


@pytest.mark.parametrize("bias", [True, False])
def test_a_term_whose_weight_comes_after_waits_in_its_rows_and_is_exact(calls, monkeypatch, bias):
    """A term hinted `After`: no chunk runs twice, its rows' head gradient waits for the weight the backward brings
    (the loss divides by a count the chunks produce), and loss and every gradient equal the unchunked ones; the
    head's weight gradient takes the waiting rows in one product."""
    head, h, x, y = setup(bias=bias, seed=3)
    with torch.no_grad():  # about half the rows agree
        x.copy_(head.weight[y] * 2 + 0.3 * x)
    inputs = [h, x, head.weight] + ([head.bias] if bias else [])

    def loss_of(t):
        return 0.3 * t["a"] + 0.7 * t["b"] + 1.3 * t["m"] / t["n"].clamp(min=1)

    whole = masked_fn(head, h, x, y)
    assert 0 < float(whole["n"]) < len(y)
    want = grads_of(loss_of(whole), inputs)
    products = []
    real = chunks._fold_weight
    monkeypatch.setattr(chunks, "_fold_weight", lambda into, first, dz, *a: products.append(len(dz)) or
                        real(into, first, dz, *a))
    calls.clear()
    got = chunked(masked_fn, len(y), 5, h, x, y, head=head, hints={"a": 0.3, "b": 0.7, "m": chunks.After(len(y))})
    assert [s for _, s in calls] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    for w, g in zip(want, grads_of(loss_of(got), inputs)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    assert not twice(calls)
    assert products[-1] == int(whole["n"])  # the waiting rows: the agreeing ones, in one product
    # more waiting rows than the bound: dropped, and the backward recomputes (still exact)
    calls.clear()
    got = chunked(masked_fn, len(y), 5, h, x, y, head=head, hints={"a": 0.3, "b": 0.7, "m": chunks.After(1)})
    for w, g in zip(want, grads_of(loss_of(got), inputs)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    assert len(twice(calls)) == 5


def test_a_term_whose_weight_comes_after_is_kept_apart_without_a_recorded_head(calls):
    """A head that is not a plain linear layer's weight and bias (here: frozen, as under LoRA) records nothing: an
    `After` term is kept apart, still exact and without recomputation."""
    head, h, x, y = setup(seed=3)
    head.requires_grad_(False)

    def loss_of(t):
        return 0.3 * t["a"] + 0.7 * t["b"] - 0.4 * t["m"]

    want = grads_of(loss_of(masked_fn(head, h, x, y)), [h, x])
    got = chunked(masked_fn, len(y), 5, h, x, y, head=head, hints={"a": 0.3, "b": 0.7, "m": chunks.After(100)})
    for w, g in zip(want, grads_of(loss_of(got), [h, x])):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    assert not twice(calls)


def test_only_a_plain_trainable_head_is_recorded():
    """The chunks record a linear head whose trainable parameters are its own weight and bias; a frozen head, or one
    with parameters of its own (a LoRA adapter), is used as it is (an `After` term is then kept apart)."""
    head = torch.nn.Linear(4, 7)
    assert chunks.recorded(head)
    head.bias.requires_grad_(False)
    assert chunks.recorded(head)
    head.requires_grad_(False)
    assert not chunks.recorded(head)
    head.adapter = torch.nn.Linear(4, 2)  # trainable, not the head's weight or bias
    assert not chunks.recorded(head)
