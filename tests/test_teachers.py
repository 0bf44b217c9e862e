"""Several teachers for one student (`teachers:`): loss = (1 - alpha) CE + alpha * sum_i w_i KD_i over the rows
common to their caches."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError
from stages import distill, teacher_cache


def weights(run):
    return load_file(str(next((run / "final").glob("*.safetensors"))))


def projectors_of(run):
    """The final projectors of a run (beside final/)."""
    return next(p for p in (run / "final" / "projectors.safetensors", run / "projectors.safetensors") if p.is_file())


def metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def teachers(*entries):
    """`--set` overrides: no single cache, these teachers (cache, weight[, objective])."""
    items = ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in e.items()) + "}" for e in entries)
    return ["cache=null", f"teachers=[{items}]"]


@pytest.fixture(scope="module")
def two(caches, tmp_path_factory):
    """The tiny teacher's cache and a copy of it under another root (a second cache of the same teacher), and a
    cache of the untrained teacher-init (another teacher) over the same rows."""
    root = tmp_path_factory.mktemp("teachers")
    copy = root / "copy"
    shutil.copytree(caches.cache, copy)
    other = teacher_cache.run(caches.cache_cfg(f"out_dir={root / 'other'}", f"teacher.path={caches.assets}/teacher-init"))
    return caches, caches.cache, copy, other


@pytest.mark.parametrize("objective", ["kd", "dskd_v2"])
def test_weights_one_and_zero_are_the_single_teacher_run_bit_for_bit(two, tmp_path, objective):
    tiny, cache, _, other = two
    common = [f"loss.objective={objective}", "train.log_every=1", f"out_dir={tmp_path}"]
    single = distill.run(tiny.distill_cfg(*common, "run_name=single"))
    both = distill.run(tiny.distill_cfg(*common, "run_name=both", *teachers({"cache": cache, "weight": 1.0},
                                                                             {"cache": other, "weight": 0.0})))
    a, b = metrics(single), metrics(both)
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["ce"] for r in a] == [r["ce"] for r in b]
    assert all(len([k for k in r if k.endswith(".kd")]) == 2 for r in b)  # the weight-0 teacher is computed, reported
    wa, wb = weights(single), weights(both)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_caches_of_one_teacher_at_half_weight_are_the_single_teacher_run(two, tmp_path):
    tiny, cache, copy, _ = two
    common = ["loss.objective=kd", "train.log_every=1", f"out_dir={tmp_path}"]
    single = distill.run(tiny.distill_cfg(*common, "run_name=single"))
    both = distill.run(tiny.distill_cfg(*common, "run_name=both", *teachers({"cache": cache, "weight": 0.5},
                                                                             {"cache": copy, "weight": 0.5})))
    a, b = metrics(single), metrics(both)
    names = [k for k in b[0] if k.endswith(".kd")]
    assert names == ["tiny-teacher1.kd", "tiny-teacher2.kd"]  # one name twice: numbered
    # float summation: each teacher's pass sums its CE and KD gradients in its own products, and the later steps
    # train from weights that differ in their last bits (rel. 2e-6 at step 4 with the pinned AVX2 kernels)
    assert [x["loss_tokens"] for x in a] == [y["loss_tokens"] for y in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-5) and y["kd"] == pytest.approx(x["kd"], rel=2e-5)
        assert y["tiny-teacher1.kd"] == y["tiny-teacher2.kd"] == pytest.approx(x["kd"], rel=2e-5)
    wa, wb = weights(single), weights(both)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_each_teacher_has_its_own_objective_and_projectors(two, tmp_path):
    """kd from one teacher and dskd_v2 from another: the dskd_v2 teacher's projectors are saved under its name."""
    tiny, cache, _, other = two
    run = distill.run(tiny.distill_cfg(f"out_dir={tmp_path}", "train.log_every=1", "loss.objective=kd", *teachers(
        {"cache": cache, "weight": 0.7}, {"cache": other, "weight": 0.3, "objective": "dskd_v2", "name": "init"})))
    r = metrics(run)[-1]
    assert run.name == "tiny-teacher+init_to_tiny-student__kd_fkl"
    assert "tiny-teacher.kd" in r and "init.t2s_ce" in r and "init.t2s_agreement" in r
    assert r["kd"] == pytest.approx(0.7 * r["tiny-teacher.kd"] + 0.3 * r["init.kd"], rel=1e-5)
    saved = load_file(str(projectors_of(run)))
    assert saved and all(k.startswith("members.init.") for k in saved)
    init = json.loads((run / "t2s_init.init.json").read_text())  # the dskd_v2 teacher's t2s start, and why
    assert init["t2s_init"] in ("fit", "plain") and "t2s_init_fit_ce" in init and not (run / "t2s_init.json").exists()


def test_rows_are_those_of_every_cache_and_none_is_refused(two, tmp_path, capsys):
    tiny, cache, _, _ = two
    part = teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path / 'part'}", "data.limit=100"))
    run = distill.run(tiny.distill_cfg(f"out_dir={tmp_path}", "train.steps=1", *teachers(
        {"cache": cache, "weight": 1.0}, {"cache": part, "weight": 1.0, "name": "part"}), "loss.objective=kd"))
    assert "100 rows in all 2 teachers' caches" in capsys.readouterr().out and (run / "done.json").exists()
    rows = (tmp_path / "rows.jsonl")
    rows.write_text("".join(json.dumps({"id": f"new-{i}", "prompt": "a b", "response": "c d"}) + "\n" for i in range(20)))
    disjoint = teacher_cache.run(tiny.cache_cfg(f"out_dir={tmp_path / 'dis'}", f"data.path={rows}"))
    with pytest.raises(ConfigError, match="no row id is in every cache"):
        distill.run(tiny.distill_cfg(f"out_dir={tmp_path}", "run_name=none", "loss.objective=kd", *teachers(
            {"cache": cache, "weight": 1.0}, {"cache": disjoint, "weight": 1.0})))


@pytest.mark.parametrize("bad,match", [
    (["cache=x"], "not two"),
    (["valid.every=2"], "leave them off"),
    (["teachers=[{cache: a, weight: 0}]"], "sum to 0"),
])
def test_bad_teachers_settings_are_refused(tiny, bad, match):
    with pytest.raises(ConfigError, match=match):
        tiny.distill_cfg(*teachers({"cache": "a", "weight": 1.0}), *bad)


def test_a_two_teacher_run_resumes_on_the_uninterrupted_curve(two, tmp_path, monkeypatch):
    """kd from one teacher and dskd_v2 (its projectors in the engine) from another, interrupted while checkpoint 4 is
    written and resumed from checkpoint 2: the loss curve and the final weights and projectors of the straight run."""
    import errno

    from pipeline.train.checkpoint import CheckpointError
    from tests.test_train import _fail_checkpoint_at, assert_same_curve, assert_same_weights

    tiny, cache, _, other = two
    common = [f"out_dir={tmp_path}", "train.steps=6", "train.log_every=1", "checkpoint.every=2", "loss.objective=kd",
              *teachers({"cache": cache, "weight": 0.6}, {"cache": other, "weight": 0.4, "objective": "dskd_v2"})]
    straight = distill.run(tiny.distill_cfg(*common, "run_name=straight"))
    cfg = tiny.distill_cfg(*common, "run_name=resumed")
    _fail_checkpoint_at(monkeypatch, 4, OSError(errno.EIO, "I/O error"))
    with pytest.raises(CheckpointError):
        distill.run(cfg)
    monkeypatch.undo()
    resumed = distill.run(cfg, resume=True)
    keys = ("loss", "ce", "kd", "tiny-teacher1.kd", "tiny-teacher2.t2s_ce")
    assert all(k in r for r in metrics(resumed) for k in keys)
    assert_same_curve(straight, resumed, keys=keys)
    assert_same_weights(straight, resumed)
    a, b = (load_file(str(projectors_of(r))) for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
