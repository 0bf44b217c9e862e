"""Divergences against a float64 brute-force reference (values and gradients), their properties, sparse top-k +
tail teachers, ULD's sorted L1, and the token normaliser."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.losses import (
    DIVERGENCES,
    LOG_FLOOR,
    SparseLogits,
    cross_entropy_sum,
    divergence,
    floored,
    log_softmax,
    sorted_l1,
    token_normaliser,
)


def _kl64(a, b):
    return sum(a[v] * (math.log(a[v]) - math.log(b[v])) for v in range(len(a)) if a[v] > 0)


def brute_one(name, p, q, skew=0.1, mu=0.5, beta=0.5):
    """One position, plain Python floats over probability lists: the definitions as written in the issue (gjsd: as
    TRL's GKD writes it, with its beta = 0 / 1 branches)."""
    if name == "gjsd":
        if beta in (0.0, 1.0):
            return _kl64(p, q) if beta == 0.0 else _kl64(q, p)
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        return beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)
    if name == "fkl":
        return _kl64(p, q)
    if name == "rkl":
        return _kl64(q, p)
    if name == "js":
        m = [(a + b) / 2 for a, b in zip(p, q)]
        return (_kl64(p, m) + _kl64(q, m)) / 2
    if name == "skl":
        return _kl64(p, [skew * a + (1 - skew) * b for a, b in zip(p, q)])
    if name == "srkl":
        return _kl64(q, [skew * b + (1 - skew) * a for a, b in zip(p, q)])
    if name == "tvd":
        return sum(abs(a - b) for a, b in zip(p, q)) / 2
    if name == "akl":
        order = sorted(range(len(p)), key=lambda v: p[v])
        c, g_head, g_tail = 0.0, 0.0, 0.0
        for v in order:
            c += p[v]
            if c <= mu:
                g_tail += abs(p[v] - q[v])
            else:
                g_head += abs(p[v] - q[v])
        if g_head + g_tail == 0:
            return 0.0
        return (g_head * _kl64(p, q) + g_tail * _kl64(q, p)) / (g_head + g_tail)
    raise ValueError(name)


def brute(name, s, t, T, **kw):
    out = torch.zeros(s.shape[:-1], dtype=torch.float64)
    for idx in itertools.product(*(range(n) for n in s.shape[:-1])):
        q = torch.softmax(s[idx].double() / T, -1).tolist()
        p = torch.softmax(t[idx].double() / T, -1).tolist()
        out[idx] = brute_one(name, p, q, **kw)
    return out


def closed_form64(name, s, t, T, skew=0.1, mu=0.5, beta=0.5):
    """A differentiable float64 version in probability space (no log-floor tricks), for gradients."""
    q, p = torch.softmax(s / T, -1), torch.softmax(t / T, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "gjsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)

    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "js":
        m = (p + q) / 2
        return (kl(p, m) + kl(q, m)) / 2
    if name == "skl":
        return kl(p, skew * p + (1 - skew) * q)
    if name == "srkl":
        return kl(q, skew * q + (1 - skew) * p)
    if name == "tvd":
        return (p - q).abs().sum(-1) / 2
    ps, order = p.detach().sort(-1)
    gap = (ps - q.detach().gather(-1, order)).abs()
    tail = ps.cumsum(-1) <= mu
    gt, gh = (gap * tail).sum(-1), (gap * ~tail).sum(-1)
    return (gh * kl(p, q) + gt * kl(q, p)) / (gh + gt)


def _logits(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("scale", [3.0, 40.0])  # 40: many probabilities far below float32's smallest normal
def test_values_and_gradients_match_float64(name, T, scale):
    s, t = _logits(3, 4, 11, scale=scale), _logits(3, 4, 11, scale=scale, seed=1)
    got = divergence(name, s.float(), t.float(), temperature=T, reduction="none")
    torch.testing.assert_close(got.double(), brute(name, s, t, T), atol=1e-5, rtol=1e-5)
    s32 = s.float().requires_grad_()
    divergence(name, s32, t.float(), temperature=T, reduction="sum").backward()
    s64 = s.clone().requires_grad_()
    closed_form64(name, s64, t, T).sum().backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_extreme_logits_stay_finite(name):
    # -inf (masked vocabulary), probabilities that underflow, and huge gaps
    s = torch.tensor([[0.0, -float("inf"), 3.0, -1e4], [80.0, -80.0, 0.0, 0.0], [1e3, -1e3, 0.0, 5.0]], requires_grad=True)
    t = torch.tensor([[1.0, -float("inf"), -1e4, 2.0], [-80.0, 80.0, 0.0, 0.0], [-1e3, 1e3, 0.0, 5.0]])
    out = divergence(name, s, t, reduction="sum", skew=0.0) + divergence(name, s, t, reduction="sum", skew=1.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    sparse = SparseLogits(torch.tensor([[2, 0], [1, 2], [1, 3]]), torch.tensor([[-1e4, 1.0], [80.0, 0.0], [1e3, 5.0]]),
                          torch.logsumexp(t, -1), 4)
    s.grad = None
    out = divergence(name, s, sparse, reduction="sum", temperature=2.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_identical_inputs_give_zero_and_mask(name):
    x = torch.randn(5, 7)
    assert divergence(name, x, x).abs().item() < 1e-6
    y = torch.randn(5, 7)
    mask = torch.tensor([True, False, True, False, False])
    per = divergence(name, x, y, reduction="none")
    assert (per[~mask] != 0).all() or name == "tvd"
    torch.testing.assert_close(divergence(name, x, y, mask, reduction="sum"), per[mask].sum())
    torch.testing.assert_close(divergence(name, x, y, mask, reduction="mean"), per[mask].mean())
    torch.testing.assert_close(divergence(name, x, y, mask, reduction="none")[~mask], torch.zeros(3))


def test_properties():
    s, t = _logits(6, 13).float(), _logits(6, 13, seed=1).float()
    d = lambda name, a, b, **kw: divergence(name, a, b, reduction="none", **kw)  # noqa: E731
    torch.testing.assert_close(d("js", s, t), d("js", t, s))
    torch.testing.assert_close(d("tvd", s, t), d("tvd", t, s))
    torch.testing.assert_close(d("skl", s, t, skew=0.0), d("fkl", s, t))
    torch.testing.assert_close(d("srkl", s, t, skew=0.0), d("rkl", s, t))
    torch.testing.assert_close(d("skl", s, t, skew=1.0), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(d("srkl", s, t, skew=1.0), torch.zeros(6), atol=1e-6, rtol=0)
    # akl: mu = 0 puts every entry in the head, which gives fkl
    torch.testing.assert_close(d("akl", s, t, akl_mu=0.0), d("fkl", s, t))
    for name in DIVERGENCES:
        torch.testing.assert_close(d(name, s, t, temperature=2.5), d(name, s / 2.5, t / 2.5))
        assert (d(name, s, t) >= -1e-6).all()
    # js and tvd are bounded by log 2 and 1
    assert (d("js", 50 * s, -50 * s) <= math.log(2) + 1e-5).all() and (d("tvd", 50 * s, -50 * s) <= 1 + 1e-6).all()


def test_bfloat16_inputs_are_computed_in_float32():
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    got = divergence("fkl", s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, divergence("fkl", s.bfloat16().float(), t.bfloat16().float()))


def _sparse(t: torch.Tensor, k: int) -> SparseLogits:
    top = t.topk(k, dim=-1)
    return SparseLogits(top.indices, top.values, torch.logsumexp(t, -1), t.shape[-1])


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sparse_with_k_equal_v_is_dense(name, T):
    s, t = _logits(4, 9).float(), _logits(4, 9, seed=1).float()
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    dense = divergence(name, s1, t, temperature=T, reduction="none")
    sparse = divergence(name, s2, _sparse(t, 9), temperature=T, reduction="none")
    torch.testing.assert_close(sparse, dense, atol=1e-6, rtol=1e-5)
    dense.sum().backward()
    sparse.sum().backward()
    torch.testing.assert_close(s2.grad, s1.grad, atol=1e-6, rtol=1e-5)


def _bucket_brute(name, s, t, ids, T):
    """Both full distributions at temperature T collapsed onto the ids + one tail bucket, then the definition."""
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    rest = torch.ones(len(t), dtype=torch.bool)
    rest[ids] = False
    return brute_one(name, p[ids].tolist() + [float(p[rest].sum())], q[ids].tolist() + [float(q[rest].sum())])


@pytest.mark.parametrize("name", DIVERGENCES)
def test_sparse_top_k_is_the_divergence_over_k_plus_tail_buckets(name):
    # at T = 1 every bucket is exact for any teacher
    s, t, k = _logits(3, 12), _logits(3, 12, seed=1), 4
    got = divergence(name, s.float(), _sparse(t.float(), k), reduction="none")
    ref = torch.tensor([_bucket_brute(name, s[i], t[i], t[i].topk(k).indices, 1.0) for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)
    # at T != 1 the tail is mean-field: exact when the teacher's tail logits are equal
    t[:, 4:] = 0.0
    t[:, :4] = torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    got = divergence(name, s.float(), _sparse(t.float(), k), temperature=3.0, reduction="none")
    ref = torch.tensor([_bucket_brute(name, s[i], t[i], torch.arange(4), 3.0) for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-4)


def test_sparse_dense_log_probs_and_argmax():
    t = torch.tensor([[3.0, 1.0, 0.0, 0.0, 0.0]])  # equal tail logits: the mean-field tail is exact at any T
    sp = _sparse(t, 2)
    for T in (1.0, 3.0):
        torch.testing.assert_close(sp.dense_log_probs(T), torch.log_softmax(t / T, -1))
    assert sp.argmax().item() == 0
    full = _sparse(t, 5)
    torch.testing.assert_close(full.dense_log_probs(2.0), torch.log_softmax(t / 2.0, -1))


def test_sorted_l1_matches_brute_force_across_vocab_sizes():
    s, t = _logits(3, 7).float(), _logits(3, 10, seed=1).float()
    got = sorted_l1(s, t)
    for i in range(3):
        q = sorted(torch.softmax(s[i].double(), -1).tolist(), reverse=True) + [0.0] * 3
        p = sorted(torch.softmax(t[i].double(), -1).tolist(), reverse=True)
        assert abs(got[i].item() - sum(abs(a - b) for a, b in zip(p, q))) < 1e-5
    # sparse with k = V is dense; with k < V a lower bound
    t2 = _logits(3, 7, seed=2).float()
    torch.testing.assert_close(sorted_l1(s, _sparse(t2, 7)), sorted_l1(s, t2))
    assert (sorted_l1(s, _sparse(t2, 3)) <= sorted_l1(s, t2) + 1e-6).all()


def test_cross_entropy_ignores_minus_100():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 4]])
    ref = sum(-torch.log_softmax(logits[b, i], -1)[labels[b, i]] for b, i in [(0, 0), (0, 2), (1, 2)])
    torch.testing.assert_close(cross_entropy_sum(logits, labels), ref)


def test_cross_entropy_from_a_given_log_softmax_is_the_same():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 4]])
    a = cross_entropy_sum(logits, labels)
    (ga,) = torch.autograd.grad(a, logits)
    b = cross_entropy_sum(logits, labels, log_softmax(logits))
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_floored_copies_only_when_an_entry_is_below_the_floor():
    x = torch.log_softmax(torch.randn(3, 6), -1).requires_grad_()
    assert floored(x) is x  # nothing to floor: no copy
    y = torch.tensor([[0.0, -2e4, -1.0]], requires_grad=True)
    out = floored(y)
    assert out is not y and out.min().item() == LOG_FLOOR and y.min().item() == -2e4
    out.sum().backward()
    assert y.grad.tolist() == [[1.0, 0.0, 1.0]]  # clamp's gradient
    z = torch.tensor([0.0, -3e4])
    assert floored(z, in_place=True) is z and z[1].item() == LOG_FLOOR


@pytest.mark.parametrize("name", DIVERGENCES)
def test_a_divergence_from_given_log_softmaxes_is_the_same(name):
    """The log-softmaxes a caller shares with its CE terms (`student_log_probs`, `teacher_log_probs`) give the
    divergence's own values and gradients, with extreme logits where the floor applies too."""
    for s0, t0 in [(torch.randn(4, 9), torch.randn(4, 9)),
                   (torch.tensor([[0.0, -float("inf"), 3.0, -1e4]]), torch.tensor([[1.0, -float("inf"), -3e4, 2.0]]))]:
        got = []
        for shared in (False, True):
            s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
            kw = {"student_log_probs": log_softmax(s), "teacher_log_probs": log_softmax(t).detach()} if shared else {}
            out = divergence(name, s, t.detach(), reduction="sum", **kw)
            got.append((out, torch.autograd.grad(out, s)[0]))
        torch.testing.assert_close(got[0][0], got[1][0])
        torch.testing.assert_close(got[0][1], got[1][1])


def test_token_normaliser_gives_global_token_mean():
    # two ranks x two micro-batches with uneven token counts: sum_i (s_i / N) / (acc * world) == sum s / sum n
    counts, sums = [3, 5, 7, 1], [1.5, 2.0, 4.0, 0.5]
    n = token_normaliser(sum(counts), grad_accum=2, world_size=2)
    assert math.isclose(sum(s / n for s in sums) / 4, sum(sums) / sum(counts))


def test_auto_chunk_positions_bound_a_chunk_of_logits():
    from pipeline.losses import CHUNK_ELEMENTS, auto_chunk_positions

    assert auto_chunk_positions(512) == 1024 and auto_chunk_positions(49_152) == 256
    assert auto_chunk_positions(151_936) == 64 and auto_chunk_positions(262_144) == 64
    assert auto_chunk_positions(10**8) == 16
    for v in (512, 32_000, 49_152, 128_256, 151_936, 262_144):
        n = auto_chunk_positions(v)
        assert n & (n - 1) == 0 and (n * v <= CHUNK_ELEMENTS or n == 16)
        assert n == 1024 or 2 * n * v > CHUNK_ELEMENTS  # the largest power of two that fits


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
def test_gjsd_is_trls_generalised_jsd(beta):
    """Values and gradients against float64 brute force at every beta, TRL's forward / reverse KL branches at 0 and
    1, the identity gjsd(beta) = beta skl(skew=beta) + (1 - beta) srkl(skew=1 - beta), and js at 1/2."""
    s, t = _logits(3, 4, 11), _logits(3, 4, 11, seed=1)
    got = divergence("gjsd", s.float(), t.float(), beta=beta, temperature=2.0, reduction="none")
    torch.testing.assert_close(got.double(), brute("gjsd", s, t, 2.0, beta=beta), atol=1e-5, rtol=1e-5)
    d = lambda name, **kw: divergence(name, s.float(), t.float(), reduction="none", **kw)  # noqa: E731
    if beta in (0.0, 1.0):
        torch.testing.assert_close(got, d("fkl" if beta == 0.0 else "rkl", temperature=2.0))
    else:
        torch.testing.assert_close(d("gjsd", beta=beta), beta * d("skl", skew=beta) + (1 - beta) * d("srkl", skew=1 - beta))
        s64 = s.clone().requires_grad_()
        closed_form64("gjsd", s64, t, 1.0, beta=beta).sum().backward()
        s32 = s.float().requires_grad_()
        divergence("gjsd", s32, t.float(), beta=beta, reduction="sum").backward()
        torch.testing.assert_close(s32.grad.double(), s64.grad, atol=1e-5, rtol=1e-4)
    if beta == 0.5:
        torch.testing.assert_close(got, d("js", temperature=2.0))


def test_statistics_fold_by_one_convention_for_tensors_and_floats():
    """`max_` words are maxima, the rest sums: chunks of positions (tensors) and micro-batches
    (floats) alike."""
    from pipeline.losses import accumulate, is_maximum

    assert is_maximum("max_err") and is_maximum("teacher_max_err") and not is_maximum("maximal") and not is_maximum("kd")
    t = accumulate({}, {"kd": torch.tensor(1.0), "max_err": torch.tensor(0.5)})
    accumulate(t, {"kd": torch.tensor(2.0), "max_err": torch.tensor(0.25)})
    assert float(t["kd"]) == 3.0 and float(t["max_err"]) == 0.5
    f = accumulate({}, {"aligned_positions": 4.0, "teacher_max_err": 0.1})
    accumulate(f, {"aligned_positions": 6.0, "teacher_max_err": 0.3})
    assert f == {"aligned_positions": 10.0, "teacher_max_err": 0.3}
