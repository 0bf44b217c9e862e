"""Stage 2's trainer: ZeRO stages and processes, LoRA, checkpoints and resume, validation, sweeps and bad states."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from pipeline.config import ConfigError, DistillConfig, dump_config, load_config
from pipeline.objectives import chunks
from pipeline.train import checkpoint, engine
from pipeline.train.checkpoint import CheckpointError, TrainingDiverged
from pipeline.train.sampler import MicroBatchStream, eval_batches
from stages import distill, teacher_cache
from tests.conftest import ROOT
from tests.test_objectives import always_wait


def rows(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_curve(a, b, keys=("loss", "ce", "kd"), rel=1e-6, abs_tol=1e-7):
    ra, rb = rows(a), rows(b)
    assert sorted(ra) == sorted(rb)
    for step in ra:
        for k in keys:
            if k in ra[step]:
                assert ra[step][k] == pytest.approx(rb[step][k], rel=rel, abs=abs_tol), (step, k)


# --------------------------------------------------------------------------------------------------------------
# Micro-batch stream and schedule (no training)


def test_stream_is_deterministic_world_independent_and_covers_each_epoch():
    lengths = np.random.default_rng(0).integers(5, 90, size=203)
    s = MicroBatchStream(lengths, 8, seed=3)
    assert s.per_epoch == 25
    epoch = [i for b in s.epoch(0) for i in b]
    assert len(epoch) == len(set(epoch)) == 200  # each row at most once, only the last partial batch dropped
    assert s.epoch(1) != s.epoch(0) and MicroBatchStream(lengths, 8, seed=3).epoch(1) == s.epoch(1)
    # the micro-batches of a step do not depend on how they are spread over ranks and accumulation
    for step in (1, 7, 30):  # 30 crosses into the second epoch
        one = s.for_step(step, 0, 1, 4)
        two = [b for r in range(2) for b in s.for_step(step, r, 2, 2)]
        four = [b for r in range(4) for b in s.for_step(step, r, 4, 1)]
        assert one == two == four


def test_length_grouping_reduces_padding():
    lengths = np.random.default_rng(1).integers(5, 200, size=4096)

    def padding(stream):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in stream.epoch(0))

    grouped, flat = MicroBatchStream(lengths, 16, 0), MicroBatchStream(lengths, 16, 0, group_by_length=False)
    assert padding(grouped) < 0.1 * padding(flat)
    # grouped batches still come in random order, not sorted by length
    maxima = [lengths[b].max() for b in grouped.epoch(0)]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    assert sorted(i for b in eval_batches(lengths[:50], 16) for i in b) == list(range(50))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules(tiny, schedule):
    t = tiny.distill_cfg("train.steps=100", "train.warmup_steps=10", "train.lr=1e-3", "train.min_lr=1e-4",
                         f"train.schedule={schedule}").train
    f = engine.lr_lambda(t)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    end = 1.0 if schedule == "constant" else 0.1
    assert f(100) == pytest.approx(end)
    mid = {"cosine": 0.55, "linear": 0.55, "constant": 1.0}[schedule]
    assert f(55) == pytest.approx(mid)
    assert all(f(i) >= f(i + 1) - 1e-12 for i in range(10, 100))


def test_param_groups_exclude_biases_and_norms_from_weight_decay(tiny):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny.assets / "student-init")
    decay, no_decay = engine.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" not in names[id(p)] and not names[id(p)].endswith("bias") for p in decay["params"])
    assert {names[id(p)].split(".")[-2] for p in no_decay["params"]} >= {"input_layernorm", "q_proj"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_projectors_train_at_the_students_rate_unless_told(tiny):
    from pipeline.objectives.projectors import Projectors

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny.assets / "student-init")
    proj = Projectors("dskd", 64, 64)
    for sets, want in (([], 3e-3), (["train.projector_lr=5e-4"], 5e-4)):
        groups = engine.optimizer_groups(model, proj, tiny.distill_cfg("train.lr=3e-3", *sets).train)
        assert [g["lr"] for g in groups] == [3e-3, 3e-3, want]
        assert groups[-1]["params"] == list(proj.parameters())
    assert [g["lr"] for g in engine.optimizer_groups(model, None, tiny.distill_cfg("train.lr=3e-3").train)] == [3e-3] * 2
    with pytest.raises(ConfigError, match="train.projector_lr must be > 0"):
        tiny.distill_cfg("train.projector_lr=0")


def test_adamw_takes_the_configured_betas(tiny):
    ds = {}
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}]
    assert engine.make_optimizer(groups, tiny.distill_cfg().train, ds).defaults["betas"] == (0.9, 0.95)
    ref = engine.make_optimizer(groups, tiny.distill_cfg("train.betas=[0.9,0.999]").train, ds)
    assert ref.defaults["betas"] == (0.9, 0.999)  # the DSKD reference's (torch's default)
    for bad in ("[0.9]", "[0.9,1.0]", "[-0.1,0.9]"):
        with pytest.raises(ConfigError, match="train.betas must be two numbers"):
            tiny.distill_cfg(f"train.betas={bad}")


def test_deepspeed_config_is_filled_from_the_run_config(tiny):
    t = tiny.distill_cfg("train.micro_batch_size=4", "train.grad_accum=6", "train.grad_clip=0.5",
                         "train.deepspeed=configs/deepspeed/zero3_offload.json", "train.precision=bf16").train
    ds = engine.deepspeed_config(t, world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 3, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and engine.offloads(ds)


# --------------------------------------------------------------------------------------------------------------
# DeepSpeed


def test_zero_stages_train_alike_in_one_process(caches, monkeypatch):
    """ZeRO 0, 2 and 3 (and 2 with optimizer offload), with and without fused chunks, give the same loss curve and the
    same final weights; dskd_v2 reads the student head outside its module (gathered under ZeRO-3). Fused, the steps
    after the first let the masked term wait for its weight (`chunks.After`), the head gathered for that too."""
    waited = []
    real = chunks._Run._wait
    monkeypatch.setattr(chunks._Run, "_wait", lambda self, *a: waited.append(1) or real(self, *a))
    always_wait(monkeypatch)
    # every buffer the chunks sum into from malloc, as a real vocabulary's (V x d) head gradient is (chunks.buffer):
    # DeepSpeed takes that gradient as it takes one of torch's allocator
    monkeypatch.setattr(chunks, "MALLOC_BYTES", 0)
    runs = {}
    for ds in ("zero0", "zero2", "zero3", "zero2_offload", "zero3 fused", "zero0 fused"):
        # "fused": 16-position chunks of the vocabulary-sized work, each chunk's gradients taken in the forward
        # (objectives/chunks.py), the ZeRO-3 head gathered around them; the others run every position at once
        fused = ["loss.chunk_positions=16"] if ds.endswith("fused") else []
        before = len(waited)
        runs[ds] = distill.run(caches.distill_cfg(f"train.deepspeed=configs/deepspeed/{ds.split()[0]}.json",
                                                  "train.steps=3", "train.log_every=1", "loss.objective=dskd_v2",
                                                  f"run_name=zero-{ds.replace(' ', '-')}", *fused))
        assert (len(waited) > before) == bool(fused), ds
    ref = weights(runs["zero0"])
    for ds, run_dir in runs.items():
        # float32 sums in another order per ZeRO stage: t2s_kd (about 0.007, few agreeing positions) moves by 2e-7
        assert_same_curve(runs["zero0"], run_dir, keys=("loss", "ce", "kd", "t2s_ce", "t2s_kd", "s2t_kd"), rel=1e-5,
                          abs_tol=1e-6)
        got = weights(run_dir)
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k, ds=ds: f"{ds} {k}: {m}")


def test_gradient_checkpointing_changes_memory_not_the_curve(caches):
    common = ["train.steps=3", "train.log_every=1", "loss.objective=dskd_v2"]
    plain = distill.run(caches.distill_cfg(*common, "run_name=gc-off"))
    recomputed = distill.run(caches.distill_cfg(*common, "train.gradient_checkpointing=true", "run_name=gc-on"))
    assert_same_curve(plain, recomputed, keys=("loss", "ce", "kd", "t2s_ce", "t2s_kd", "s2t_kd"), rel=1e-5)
    for k, v in weights(plain).items():
        torch.testing.assert_close(weights(recomputed)[k], v, atol=1e-6, rtol=1e-5)


def _write_config(cfg, path):
    dump_config(cfg, path)
    return str(path)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two ranks need a device each (one GPU here)")
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_processes_match_one_process_with_the_same_global_batch(caches, tmp_path, zero):
    """The same config (micro 8 x grad_accum 2) on 1 rank and on 2 ranks (gloo, each taking one micro-batch of the
    accumulation) sees the same rows per step: same losses, and the same validation loss (batches and generation
    sharded over the ranks, padded to equal counts for ZeRO-3)."""
    common = [f"train.deepspeed=configs/deepspeed/{zero}.json", "train.steps=3", "train.log_every=1",
              f"out_dir={tmp_path}", "loss.objective=dskd_v2", "valid.every=3", "valid.generate_rows=3",
              "valid.max_new_tokens=4"]
    one = distill.run(caches.distill_cfg(*common, "train.grad_accum=2", "run_name=one"))
    cfg = _write_config(caches.distill_cfg(*common, "train.grad_accum=2", "run_name=two"), tmp_path / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSKD_CPU_THREADS": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # this process's own group
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "stages.cli", "distill", "--config", cfg],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert_same_curve(one, two, keys=("loss", "ce", "kd", "t2s_ce", "s2t_kd", "loss_tokens", "valid_loss", "valid_kd"),
                      rel=1e-5)
    assert rows(one)[1]["loss_tokens"] == rows(two)[1]["loss_tokens"]
    assert 0 <= rows(two)[3]["valid_rougeL"] <= 100
    assert (two / "final" / "model.safetensors").is_file() and (two / "projectors.safetensors").is_file()
    for k, v in weights(one).items():  # ZeRO-3 saves the gathered weights, not the rank's partition
        torch.testing.assert_close(weights(two)[k], v, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_adapter_and_merged_reload_to_the_trained_student(caches):
    from peft import PeftModel

    from pipeline.config import ModelRef
    from pipeline.models.load import load_model

    lora = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "train.steps=3", "train.lr=1e-2"]
    adapter = distill.run(caches.distill_cfg(*lora, "lora.save=adapter", "run_name=lora-adapter"))
    merged = distill.run(caches.distill_cfg(*lora, "lora.save=merged", "run_name=lora-merged"))
    # the frozen head under fused chunks: no weight gradient kept, the same curve
    fused = distill.run(caches.distill_cfg(*lora, "lora.save=adapter", "loss.chunk_positions=16", "run_name=lora-fused"))
    assert_same_curve(adapter, fused, rel=1e-5, abs_tol=1e-6)
    assert (adapter / "final" / "adapter_config.json").is_file() and not (adapter / "final" / "model.safetensors").exists()
    assert (merged / "final" / "model.safetensors").is_file() and not (merged / "final" / "adapter_config.json").exists()
    assert_same_curve(adapter, merged)

    base_dir = caches.assets / "student-init"
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
        plain = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, adapter / "final").eval()(ids).logits
        full = transformers.AutoModelForCausalLM.from_pretrained(merged / "final").eval()(ids).logits
        ours = load_model(ModelRef(path=str(adapter / "final")))(ids).logits  # what `dskd eval` loads
    torch.testing.assert_close(with_adapter, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)
    assert (full - plain).abs().max() > 1e-3  # the adapter learned something
    # only the adapters trained: the merged model differs from the base in the targeted projections only
    sd_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    sd_merged = transformers.AutoModelForCausalLM.from_pretrained(merged / "final").state_dict()
    changed = {k.split(".")[-2] for k in sd_base if not torch.equal(sd_base[k], sd_merged[k])}
    assert changed and changed <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_unknown_target_is_refused(caches):
    with pytest.raises(ConfigError, match="not found in the student"):
        distill.run(caches.distill_cfg("lora.enabled=true", "lora.target_modules=[c_attn]", "run_name=lora-bad"))


# --------------------------------------------------------------------------------------------------------------
# Checkpoints, resume and bad states


def _fail_checkpoint_at(monkeypatch, step, exc):
    """torch.save raises `exc` while checkpoint `step` is written (DeepSpeed's own files included)."""
    real = torch.save

    def save(obj, f, *a, **k):
        if checkpoint.step_name(step) in str(f):
            raise exc
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


def _straight_and_interrupted(caches, monkeypatch, common, name, exc):
    """An uninterrupted run, and the same config failing with `exc` while checkpoint 4 is written."""
    straight = distill.run(caches.distill_cfg(*common, f"run_name={name}-straight"))
    cfg = caches.distill_cfg(*common, f"run_name={name}")
    _fail_checkpoint_at(monkeypatch, 4, exc)
    with pytest.raises(CheckpointError) as failed:
        distill.run(cfg)
    monkeypatch.undo()
    return straight, cfg, caches.students / name, str(failed.value)


def assert_same_weights(a, b):
    for k, v in weights(a).items():
        torch.testing.assert_close(weights(b)[k], v, atol=0, rtol=0)


def test_disk_full_keeps_the_previous_checkpoint_and_resume_matches(caches, monkeypatch):
    common = ["train.steps=6", "train.log_every=1", "checkpoint.every=2", "loss.objective=dskd_v2"]
    straight, cfg, run_dir, error = _straight_and_interrupted(caches, monkeypatch, common, "diskfull",
                                                              OSError(errno.ENOSPC, "No space left on device"))
    assert "disk full" in error and "previous checkpoint is intact" in error
    assert [s for s, _ in checkpoint.complete(run_dir)] == [2]
    assert not list((run_dir / checkpoint.CHECKPOINTS).glob(".tmp-*")) and not (run_dir / "done.json").exists()
    state = checkpoint.read_state(run_dir / "checkpoints" / checkpoint.step_name(2))
    assert state["step"] == 2 and state["micro_batches"] == 4 and state["metrics"]["train_loss"] > 0

    with pytest.raises(ConfigError, match="--resume"):  # never silently start over on top of a checkpoint
        distill.run(cfg)
    with pytest.raises(ConfigError, match="another config"):
        distill.run(caches.distill_cfg(*common, "run_name=diskfull", "train.lr=1e-2"), resume=True)
    distill.run(cfg, resume=True)
    assert_same_curve(straight, run_dir, keys=("loss", "ce", "kd", "t2s_ce", "t2s_kd", "s2t_kd"))
    assert_same_weights(straight, run_dir)
    assert [s for s, _ in checkpoint.complete(run_dir)] == [6]  # keep_best 0: only the newest is kept


def test_lora_resume_continues_the_same_curve(caches, monkeypatch):
    common = ["train.steps=4", "train.log_every=1", "checkpoint.every=2", "lora.enabled=true", "lora.r=4",
              "lora.save=adapter", "train.lr=1e-2"]
    straight, cfg, run_dir, error = _straight_and_interrupted(caches, monkeypatch, common, "lora-resumed",
                                                              OSError(errno.EIO, "I/O error"))
    assert "I/O error" in error
    distill.run(cfg, resume=True)
    assert_same_curve(straight, run_dir)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pipeline.train import checkpoint, engine
    real = checkpoint._fsync_tree
    def fsync_then_die(path):  # checkpoint 4 is fully written but not yet renamed into place: SIGKILL
        real(path)
        if path.name == ".tmp-" + checkpoint.step_name(4):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint._fsync_tree = fsync_then_die
    from stages.cli import main
    main(["distill", "--config", sys.argv[1]])
""")


@pytest.mark.slow
def test_sigkill_and_resume_give_the_uninterrupted_loss_curve(caches, tmp_path):
    common = ["train.steps=6", "train.log_every=1", "checkpoint.every=2", f"out_dir={tmp_path}"]
    straight = distill.run(caches.distill_cfg(*common, "run_name=straight"))
    cfg = caches.distill_cfg(*common, "run_name=killed")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", KILLER, _write_config(cfg, tmp_path / "killed.yaml")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    run_dir = tmp_path / "killed"
    assert [s for s, _ in checkpoint.complete(run_dir)] == [2]  # the half-committed step 4 is not a checkpoint
    assert (run_dir / "checkpoints" / f".tmp-{checkpoint.step_name(4)}").is_dir()
    assert max(rows(run_dir)) == 4  # metrics were logged up to the kill

    distill.run(cfg, resume=True)
    assert_same_curve(straight, run_dir)
    assert_same_weights(straight, run_dir)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_nan_stops_naming_step_and_term_and_saves_nothing_corrupt(caches, monkeypatch):
    # lr 1e30: weights ~1e30 after step 1, so step 2's logits overflow
    with pytest.raises(TrainingDiverged, match=r"step 2: non-finite .*kd"):
        distill.run(caches.distill_cfg("train.lr=1e30", "train.grad_clip=0", "train.warmup_steps=0",
                                       "train.schedule=constant", "checkpoint.every=1", "run_name=nan"))
    run_dir = caches.students / "nan"
    assert [s for s, _ in checkpoint.complete(run_dir)] == [1]
    assert not (run_dir / "final").exists() and not (run_dir / "done.json").exists()
    # weights that became inf in an optimizer step are refused before they reach a checkpoint
    real_step = torch.optim.AdamW.step

    def step_then_inf(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_inf)
    with pytest.raises(TrainingDiverged, match="step 1: non-finite weights"):
        distill.run(caches.distill_cfg("checkpoint.every=1", "run_name=inf"))
    assert checkpoint.complete(caches.students / "inf") == []


def test_a_same_vocabulary_objective_for_another_student_tokenizer_is_refused_before_any_view(caches):
    """kd from the teacher's cache for a student of another tokenizer: refused, before a student view is built."""
    from pipeline.cache.schema import VIEWS_DIR

    with pytest.raises(ConfigError, match=r"needs the teacher and the student to share a tokenizer; .* \(teacher "
                                          r"tokenizer \w{12}, this student's \w{12}\): a cross-tokenizer pair"):
        distill.run(caches.distill_cfg(f"student.path={caches.assets}/student-init-metaspace", "run_name=wrongtok"))
    assert not any(caches.cache.glob(f"*/{VIEWS_DIR}"))


def test_valid_cache_from_another_teacher_is_refused(caches, tmp_path):
    other = teacher_cache.run(caches.cache_cfg(f"out_dir={tmp_path}/other", f"teacher.path={caches.assets}/teacher-init",
                                               f"data.path={caches.data}/valid.jsonl"))
    with pytest.raises(ConfigError, match="another teacher"):
        distill.run(caches.distill_cfg(f"valid.cache={other}", "valid.every=2", "run_name=otherteacher"))


# --------------------------------------------------------------------------------------------------------------
# Validation and best-N


def test_validation_terms_rouge_and_best_checkpoints(caches):
    run_dir = distill.run(caches.distill_cfg(
        "train.steps=6", "train.log_every=3", "valid.every=2", "valid.generate_rows=4", "valid.max_new_tokens=4",
        "checkpoint.every=2", "checkpoint.keep_best=1", "run_name=valid"))
    r = rows(run_dir)
    assert sorted(r) == [1, 2, 3, 4, 6]
    for step in (2, 4, 6):
        assert {"valid_loss", "valid_ce", "valid_kd", "valid_rougeL"} <= set(r[step])
        assert 0 <= r[step]["valid_rougeL"] <= 100
        assert r[step]["valid_loss"] == pytest.approx(0.5 * r[step]["valid_ce"] + 0.5 * r[step]["valid_kd"])
        assert r[step]["peak_rss_mb"] > 0 and r[step]["tokens_per_s"] > 0 and r[step]["lr"] > 0
    assert "valid_loss" not in r[3]

    # the newest and the best by valid_loss are kept; best.json names the best
    by_loss = min((2, 4, 6), key=lambda s: r[s]["valid_loss"])
    kept = [s for s, _ in checkpoint.complete(run_dir)]
    assert kept == sorted({by_loss, 6})
    assert json.loads((run_dir / "best.json").read_text())["checkpoints"] == [checkpoint.step_name(by_loss)]

    # valid_loss is the token mean of the loss over the whole validation cache (recomputed independently)
    from pipeline.cache.batch import collate_cache_rows
    from pipeline.cache.store import CacheReader
    from pipeline.config import ModelRef
    from pipeline.models.load import decoder_hidden, load_model
    from pipeline.objectives.base import TeacherSide
    from pipeline.objectives.objective import Objective
    from pipeline.objectives.setup import student_side

    cfg = caches.distill_cfg()
    reader = CacheReader(caches.valid_cache)
    batch = collate_cache_rows([reader[i] for i in range(len(reader))], 0)
    student = load_model(ModelRef(path=str(run_dir / "final")))
    obj = Objective(cfg.loss, TeacherSide(reader.load_head()))
    with torch.no_grad():
        out = obj(batch, student_side(student, batch, decoder_hidden(student, batch.input_ids, batch.attention_mask)),
                  normaliser=batch.n_tokens)
    assert r[6]["valid_loss"] == pytest.approx(float(out.loss), rel=1e-5)


def test_keep_best_without_validation_is_a_config_error(caches):
    with pytest.raises(ConfigError, match="keep_best"):
        caches.distill_cfg("checkpoint.keep_best=2")
    with pytest.raises(ConfigError, match="keep_at_end"):
        caches.distill_cfg("checkpoint.keep_best=1", "checkpoint.keep_at_end=false", "valid.every=1")


def test_keep_at_end_false_leaves_final_only_and_the_same_student(caches):
    """A sweep's run that will not be trained further: checkpoints along the way (a kill still resumes), none at
    the last step, and the run's checkpoints deleted once final/ and done.json are written."""
    common = ["train.steps=3", "train.log_every=1", "checkpoint.every=2"]
    kept = distill.run(caches.distill_cfg(*common, "run_name=keep-end"))
    assert [s for s, _ in checkpoint.complete(kept)] == [3]
    dropped = distill.run(caches.distill_cfg(*common, "run_name=drop-end", "checkpoint.keep_at_end=false"))
    assert not (dropped / checkpoint.CHECKPOINTS).exists() and (dropped / "done.json").is_file()
    assert_same_curve(kept, dropped, keys=("loss",))
    assert_same_weights(kept, dropped)
    again = distill.run(caches.distill_cfg(*common, "run_name=drop-end", "checkpoint.keep_at_end=false"))
    assert again == dropped and not (dropped / checkpoint.CHECKPOINTS).exists()  # done: skipped


# --------------------------------------------------------------------------------------------------------------
# Sweep through make


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".venv/bin/dskd").exists(), reason="needs make and .venv")
def test_make_sweep_trains_one_student_per_divergence_from_one_cache(caches, tmp_path):
    """`make sweep` with this session's scaled-down configs: every earlier stage is up to date (the cache is not
    recomputed) and each divergence gets its own run directory."""
    configs = tmp_path / "configs"
    configs.mkdir()
    dump_config(caches.assets_cfg(), configs / "assets.yaml")
    dump_config(caches.teacher_sft_cfg(), configs / "teacher_sft.yaml")
    dump_config(caches.cache_cfg(), configs / "teacher_cache.yaml")
    dump_config(caches.valid_cache_cfg(), configs / "teacher_cache_valid.yaml")
    dump_config(caches.distill_cfg("train.steps=2", f"out_dir={tmp_path}/students"), configs / "distill.yaml")
    def cache_files():  # the cache's own files (CURRENT is re-pointed at it on every up-to-date run)
        return {p: p.stat().st_mtime_ns for p in caches.cache.rglob("*") if p.is_file() and p.name != "CURRENT"}

    before = cache_files()
    proc = subprocess.run(["make", "--no-print-directory", "sweep", f"CONFIGS={configs}", "DIVERGENCES=fkl rkl",
                           "OBJECTIVE=dskd_v2"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("teacher-cache: up to date") == 2  # train and valid caches: computed at most once
    assert cache_files() == before
    names = sorted(p.name for p in (tmp_path / "students").iterdir() if not p.name.startswith("."))  # not the stamps
    assert names == ["tiny-teacher_to_tiny-student__dskd_v2_fkl", "tiny-teacher_to_tiny-student__dskd_v2_rkl"]
    for name in names:
        run_dir = tmp_path / "students" / name
        assert (run_dir / "done.json").is_file() and (run_dir / "projectors.safetensors").is_file()
        assert load_config(DistillConfig, run_dir / "config.yaml").loss.divergence == name[-3:]


def test_tensorboard_sink_writes_events_or_asks_for_its_package(caches):
    import importlib.util

    cfg = caches.distill_cfg("train.steps=2", "train.report_to=[tensorboard]", "run_name=tb")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            distill.run(cfg)
    else:
        run_dir = distill.run(cfg)
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
