"""On real models: one SmolLM2-135M teacher pass serves three students of three tokenizers (the teacher's own, Gemma-3's
through a student view, Qwen2's through `dskd align`), and a student learns from two teachers' caches at once
(SmolLM2-135M with kd, Gemma-3-270M with dskd_eta). Wall times are printed (pytest -s) for the note."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from pipeline.cache.schema import VIEWS_DIR
from pipeline.cache.store import resolve_cache_dir
from tests.conftest import CONFIGS, shared_tokenizer
from tests.test_real_pairs import SHORT, STEPS, _cli, _small_copy

pytestmark = pytest.mark.slow

SMOL_PAIR = CONFIGS / "smollm2-135m_to_smollm2-135m-l10"
GEMMA_STUDENT_PAIR = CONFIGS / "smollm2-135m_to_gemma3-270m-l6"
GEMMA_TEACHER_PAIR = CONFIGS / "gemma3-270m_to_smollm2-135m"


def _sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _trained(out: str, where) -> dict:
    """The last metrics row of the one run under `where`, every loss finite."""
    (run,) = [p for p in where.iterdir() if p.is_dir() and not p.name.startswith(".")]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(v == v and abs(v) < 1e6 for m in metrics for k, v in m.items() if k.startswith("loss")), out
    return metrics[-1]


def _qwen2_student(where):
    """A tiny student on the Qwen2 tokenizer of ../shared/tokenizers (151k ids), built from a config."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = shared_tokenizer("qwen2")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=128, tie_word_embeddings=True,
                                         eos_token_id=tok.eos_token_id))
    model.save_pretrained(where)
    tok.save_pretrained(where)
    return where


def test_one_teacher_pass_serves_three_student_tokenizers(tmp_path):
    tc = _small_copy(SMOL_PAIR / "teacher_cache.yaml", tmp_path / "teacher_cache.yaml", rows=4, rows_also=2)
    t0 = time.perf_counter()
    _cli("teacher-cache", "--config", str(tc), *_sets(f"out_dir={tmp_path / 'cache'}", "cache.rows_per_shard=4",
                                                      "cache.store_embeddings=true", *SHORT))
    teacher_s = time.perf_counter() - t0
    cache = resolve_cache_dir(tmp_path / "cache")
    shards = {p.name: p.read_bytes() for p in cache.glob("shard-*.arrow")}
    # (a) the 10-layer SmolLM2 prune reads the teacher cache directly
    _cli("prune", "--config", str(SMOL_PAIR / "prune.yaml"), "--set", f"out_dir={tmp_path / 'smol-l10'}")
    out = _cli("distill", "--config", str(SMOL_PAIR / "distill.yaml"), *_sets(
        f"student.path={tmp_path / 'smol-l10'}", f"cache={cache}", f"out_dir={tmp_path / 'a'}", "loss.objective=kd",
        *SHORT, *STEPS))
    _trained(out, tmp_path / "a")
    assert not (cache / VIEWS_DIR).exists()
    # (b) the 6-layer Gemma-3 prune: stage 2 builds its view (no teacher), then trains dskd_eta
    _cli("prune", "--config", str(GEMMA_STUDENT_PAIR / "prune.yaml"), "--set", f"out_dir={tmp_path / 'gemma-l6'}")
    t0 = time.perf_counter()
    out = _cli("distill", "--config", str(GEMMA_STUDENT_PAIR / "distill.yaml"), *_sets(
        f"student.path={tmp_path / 'gemma-l6'}", f"cache={cache}", f"out_dir={tmp_path / 'b'}",
        "loss.objective=dskd_eta", *SHORT, *STEPS, "checkpoint.keep_at_end=false"))
    gemma_s = time.perf_counter() - t0
    assert "building it" in out and _trained(out, tmp_path / "b")["aligned_positions"] > 0
    # (c) a tiny student on the Qwen2 tokenizer: its view by `dskd align`, then dskd_eta
    student = _qwen2_student(tmp_path / "qwen2-tiny")
    t0 = time.perf_counter()
    _cli("align", str(cache), "--student-tokenizer", str(student))
    qwen_s = time.perf_counter() - t0
    out = _cli("distill", "--config", str(GEMMA_STUDENT_PAIR / "distill.yaml"), *_sets(
        f"student.path={student}", "student_name=qwen2-tiny", f"cache={cache}", f"out_dir={tmp_path / 'c'}",
        "loss.objective=dskd_eta", *SHORT, *STEPS))
    assert "building it" not in out and _trained(out, tmp_path / "c")["aligned_positions"] > 0
    # one teacher pass: the teacher cache's shards untouched, two views beside them, all verified
    assert {p.name: p.read_bytes() for p in cache.glob("shard-*.arrow")} == shards
    info = json.loads(_cli("cache", "info", str(cache), "--json"))
    assert len(info["views"]) == 2 and all(v["coverage"]["exact"] > 0.3 for v in info["views"])
    assert "verify: ok" in _cli("cache", "verify", str(cache))
    stats = json.loads((cache / "build_stats.json").read_text())
    print(f"\none pass, three students: teacher pass {teacher_s:.1f} s (its loop {stats['seconds']:.1f} s, "
          f"{stats['tokens']} tokens); Gemma-3 view + 1 dskd_eta step {gemma_s:.1f} s; Qwen2 view alone {qwen_s:.1f} s")


def test_a_student_learns_from_two_real_teachers(tmp_path):
    """SmolLM2-135M (kd, same tokenizer) and Gemma-3-270M (dskd_eta through the SmolLM2 view) -> the SmolLM2 prune,
    2 steps over the rows both caches hold."""
    smol = _small_copy(SMOL_PAIR / "teacher_cache.yaml", tmp_path / "smol.yaml", rows=3, rows_also=1)
    gemma = _small_copy(GEMMA_TEACHER_PAIR / "teacher_cache.yaml", tmp_path / "gemma.yaml", rows=3, rows_also=1)
    for cfg, out in ((smol, "c-smol"), (gemma, "c-gemma")):
        _cli("teacher-cache", "--config", str(cfg), *_sets(f"out_dir={tmp_path / out}", "cache.rows_per_shard=4",
                                                           "cache.store_embeddings=false", *SHORT))
    _cli("prune", "--config", str(SMOL_PAIR / "prune.yaml"), "--set", f"out_dir={tmp_path / 'smol-l10'}")
    teachers = yaml.safe_dump([{"cache": str(tmp_path / "c-smol"), "weight": 0.5, "objective": "kd"},
                               {"cache": str(tmp_path / "c-gemma"), "weight": 0.5, "objective": "dskd_eta"}],
                              default_flow_style=True).strip()
    out = _cli("distill", "--config", str(SMOL_PAIR / "distill.yaml"), *_sets(
        f"student.path={tmp_path / 'smol-l10'}", "cache=null", f"teachers={teachers}", f"out_dir={tmp_path / 's'}",
        *SHORT, *STEPS, "train.steps=2"))
    assert "rows in all 2 teachers' caches" in out and "teachers' heads resident" in out
    last = _trained(out, tmp_path / "s")
    assert last["smollm2-135m.kd"] > 0 and last["gemma3-270m.t2s_ce"] > 0
    assert last["kd"] == pytest.approx(0.5 * last["smollm2-135m.kd"] + 0.5 * last["gemma3-270m.kd"], rel=1e-4)
