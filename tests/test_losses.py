"""Divergences against a float64 brute-force reference, and the token normaliser."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.losses import cross_entropy_sum, divergence, token_normaliser


def brute(name, s, t, T):
    """Per-position KL by explicit loops in float64."""
    out = torch.zeros(s.shape[:-1], dtype=torch.float64)
    for idx in itertools.product(*(range(n) for n in s.shape[:-1])):
        q = torch.softmax(s[idx].double() / T, -1)
        p = torch.softmax(t[idx].double() / T, -1)
        a, b = (p, q) if name == "fkl" else (q, p)
        out[idx] = sum(float(a[v]) * (math.log(a[v]) - math.log(b[v])) for v in range(len(a)) if a[v] > 0)
    return out


@pytest.mark.parametrize("name", ["fkl", "rkl"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_values_and_gradients_match_float64(name, T):
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(3, 4, 11, generator=g, dtype=torch.float64)).requires_grad_()
    t = 3 * torch.randn(3, 4, 11, generator=g, dtype=torch.float64)
    got = divergence(name, s.float(), t.float(), temperature=T, reduction="none")
    torch.testing.assert_close(got.double(), brute(name, s.detach(), t, T), atol=1e-5, rtol=1e-5)
    # gradient through the fp32 implementation vs autograd through a float64 closed form
    s32 = s.detach().float().requires_grad_()
    divergence(name, s32, t.float(), temperature=T, reduction="sum").backward()
    lq, lp = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    ref = (lp.exp() * (lp - lq)).sum() if name == "fkl" else (lq.exp() * (lq - lp)).sum()
    ref.backward()
    torch.testing.assert_close(s32.grad.double(), s.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["fkl", "rkl"])
def test_identical_inputs_give_zero_and_mask(name):
    x = torch.randn(5, 7)
    assert divergence(name, x, x).abs().item() < 1e-6
    y = torch.randn(5, 7)
    mask = torch.tensor([True, False, True, False, False])
    per = divergence(name, x, y, reduction="none")
    torch.testing.assert_close(divergence(name, x, y, mask, reduction="sum"), per[mask].sum())
    torch.testing.assert_close(divergence(name, x, y, mask, reduction="mean"), per[mask].mean())


@pytest.mark.parametrize("name", ["fkl", "rkl"])
def test_extreme_logits_stay_finite(name):
    s = torch.tensor([[0.0, -float("inf"), 3.0, -1e4], [80.0, -80.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[1.0, -float("inf"), -1e4, 2.0], [-80.0, 80.0, 0.0, 0.0]])
    out = divergence(name, s, t, reduction="sum")
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_bfloat16_inputs_are_computed_in_float32():
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    got = divergence("fkl", s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, divergence("fkl", s.bfloat16().float(), t.bfloat16().float()))


def test_cross_entropy_ignores_minus_100():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 4]])
    ref = sum(-torch.log_softmax(logits[b, i], -1)[labels[b, i]] for b, i in [(0, 0), (0, 2), (1, 2)])
    torch.testing.assert_close(cross_entropy_sum(logits, labels), ref)


def test_token_normaliser_gives_global_token_mean():
    # two ranks x two micro-batches with uneven token counts: sum_i (s_i / N) / (acc * world) == sum s / sum n
    counts, sums = [3, 5, 7, 1], [1.5, 2.0, 4.0, 0.5]
    n = token_normaliser(sum(counts), grad_accum=2, world_size=2)
    assert math.isclose(sum(s / n for s in sums) / 4, sum(sums) / sum(counts))
