"""The benchmarks' arithmetic: a ratio is a figure only when it held over at least three interleaved rounds, and
ratios are taken within a round, so drift of the machine between rounds does not enter them."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from common import show, spread  # noqa: E402


def test_a_ratio_is_a_figure_only_over_three_rounds_within_ten_percent():
    s = spread([1.02, 0.98, 1.00])
    assert (s["median"], s["min"], s["max"], s["rounds"], s["stable"]) == (1.00, 0.98, 1.02, 3, True)
    assert show(s) == "1.00x (0.98-1.02)"
    wide = spread([0.77, 1.12, 0.95])  # range 0.35 > 10% of 0.95
    assert not wide["stable"] and show(wide) == "unstable (0.77-1.12x over 3 rounds)"
    assert show(spread([1.1])) == "not a figure (1.10-1.10x, 1 round; 3 needed)"
    assert not spread([1.0, 1.0])["stable"]
    assert spread([2.0, 2.1, 2.2, 2.3])["median"] == pytest.approx(2.15)  # even count: the middle two's mean
    assert spread([1.0, 1.09, 1.0])["stable"] and not spread([1.0, 1.11, 1.0])["stable"]  # the 10% line
    with pytest.raises(ValueError, match="no rounds"):
        spread([])


def test_train_bench_ratios_are_taken_within_a_round():
    """The machine halves its speed in round 2: every variant's time doubles there, the ratios do not move."""
    from train import summarise

    step = {"sft": [1.0, 2.0, 1.0], "kd": [1.1, 2.2, 1.1], "kd online": [2.2, 4.4, 2.2]}
    samples = {v: [{"step_s": t, "peak_mb": 100.0 * (1 + (v == "kd online")), "loss": 1.0, "tok_s": 1 / t} for t in ts]
               for v, ts in step.items()}
    floors = {"sft": 10e9, "kd": 11e9, "kd online": 20e9}
    out = summarise(samples, floors, mm=[20.0, 10.0, 20.0])
    v = out["variants"]
    assert v["kd"]["x_sft"]["stable"] and v["kd"]["x_sft"]["median"] == pytest.approx(1.1)
    assert v["kd"]["x_sft"]["max"] - v["kd"]["x_sft"]["min"] == pytest.approx(0, abs=1e-12)
    assert v["kd"]["measured_over_floor"]["median"] == pytest.approx(1.0)  # 1.1x sft against a floor 1.1x sft
    assert not v["kd"]["step_s_spread"]["stable"]  # the absolute time did move: 1.1 to 2.2 s
    assert v["sft"]["gflop_s"]["min"] == pytest.approx(5.0) and v["sft"]["gflop_s"]["max"] == pytest.approx(10.0)
    assert v["sft"]["of_matmul_rate"]["median"] == pytest.approx(0.5) and v["sft"]["of_matmul_rate"]["stable"]
    assert out["ratios"]["online_over_cache_time"]["median"] == pytest.approx(2.0)
    assert out["ratios"]["cache_over_online_peak"]["median"] == pytest.approx(0.5)


def test_the_checkpointed_stand_in_takes_what_the_fused_chunks_take(monkeypatch):
    """bench/train.py's checkpointed variant replaces `chunked` and the agreement count in its process: the stand-ins
    accept every parameter the real ones do and return the same shape (a drift fails `make bench` after minutes)."""
    import inspect

    from pipeline.objectives import alm, chunks, dual_space, student_space

    for module in (alm, dual_space, student_space):
        monkeypatch.setattr(module, "chunked", module.chunked)  # restored after the test
    monkeypatch.setattr(dual_space, "agreement", dual_space.agreement)
    import train

    train.checkpointed_chunks()
    assert inspect.signature(dual_space.chunked).parameters.keys() == inspect.signature(chunks.chunked).parameters.keys()
    count, first = dual_space.agreement(None, None, None, None, None)
    assert count == 0.0 and first is None


def test_step_memory_takes_the_peak_of_the_tensors_alive_at_once_and_lists_them():
    """bench/step_memory.py reads torch's profiler trace: the peak of allocated-minus-freed bytes, and the large
    tensors alive at that moment with the ops open when each was allocated."""
    from step_memory import own_tensors

    mb = 1 << 20

    def mem(ts, addr, size):
        return {"name": "[memory]", "ts": ts, "args": {"Addr": addr, "Bytes": size, "Device Type": 0}}

    trace = {"traceEvents": [
        {"ph": "X", "name": "aten::mm", "ts": 0, "dur": 5},
        {"ph": "X", "name": "aten::exp", "ts": 10, "dur": 5},
        mem(1, 1, 64 * mb), mem(11, 2, 32 * mb), mem(12, 3, 1 * mb), mem(13, 2, -32 * mb),  # peak 97 MB at ts 12
        mem(14, 3, -1 * mb), mem(20, 4, 20 * mb), mem(21, 1, -64 * mb),
        {"name": "[memory]", "ts": 22, "args": {"Addr": 9, "Bytes": 500 * mb, "Device Type": 1}},  # another device
    ]}
    peak, big = own_tensors(trace)
    assert peak == 97 and big == [(64.0, "aten::mm"), (32.0, "aten::exp")]  # the 1 MB one is below BIG
