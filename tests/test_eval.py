"""Evaluation and reports: metrics against their references, the protocol's settings at the backend, stored results
that resume and are never recomputed, the report table, the representation analysis."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from rouge_score import rouge_scorer

from pipeline.config import ConfigError, EvalConfig, ModelRef, SuiteConfig, dump_config, load_config
from pipeline.data.records import DataError
from pipeline.evaluate import metrics
from pipeline.evaluate.analysis import representation_distance, structure_distance, structure_matrices
from pipeline.evaluate.suites import (
    BUILTIN_PRESETS,
    BUILTIN_SUITES,
    PROTOCOL,
    encode_left,
    load_suite,
    preset_key,
    reference_nll,
    summarise,
)
from pipeline.generate import Completion, HFGenerator, vllm_available
from pipeline.models.load import load_model, load_tokenizer
from tests.conftest import ROOT, SHARED

# ---------------------------------------------------------------------------------------------------------------
# metrics


def test_rouge_l_is_rouge_scores_own_output():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    cases = [
        ("The cats were running quickly to the house.", ["A cat runs quickly home", "dogs bark at night"]),
        ("Jumped over the lazy dogs", ["the quick brown fox jumps over the lazy dog"]),
        ("identical text", ["identical text"]),
        ("nothing in common", ["completely different words"]),
        ("Paris is the capital of France.", ["The capital of France is Paris.", "Paris"]),
    ]
    for pred, refs in cases:
        want = max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)  # best reference, F-measure
        assert metrics.rouge_l(pred, refs) == want
    assert metrics.rouge_l("running", ["run"]) == 1.0  # stemmed
    preds, refs = [c[0] for c in cases], [c[1] for c in cases]
    want = 100 * statistics.fmean(max(scorer.score(r, p)["rougeL"].fmeasure for r in rs) for p, rs in cases)
    assert metrics.score(preds, refs)["rougeL"] == pytest.approx(want, abs=1e-12)
    assert metrics.score_suite("rougeL", preds, refs)["exact_match"] == pytest.approx(100 / 5)


@pytest.mark.parametrize("text, value", [
    ("She makes 9 * 2 = $18 every day.", 18), ("The answer is -10.", -10), ("It fell by -3.5 degrees", -3.5),
    ("from 5-10 items, so 10", 10), ("1,450,000 dollars in all", 1450000), ("It costs $1,234.50 total.", 1234.5),
    ("so 3.5 kg", 3.5), ("that is 18.", 18), ("a loss of -$5", -5), ("he pays $70,000", 70000),
    ("First 3 then 4 then 12 apples", 12), ("Step 1: 2+2=4\n#### 72\nand 5 more", 72), ("100%", 100),
    ("0.25 of them", 0.25), ("no digits here", None), ("answer: 7km", 7),
])
def test_gsm8k_final_answer_extraction(text, value):
    assert metrics.gsm8k_prediction(text) == value


def test_gsm8k_references_and_accuracy():
    assert metrics.gsm8k_reference("so 2,125 in all\n#### 2,125") == 2125
    assert metrics.gsm8k_reference("#### -10") == -10
    with pytest.raises(ValueError, match="no '####'"):
        metrics.gsm8k_reference("just text 5")
    refs = [["... #### 18"], ["... #### 1,600"], ["#### 3"]]
    preds = ["She earns $18.00 a day.", "The total is 1600 dollars", "I think 4"]
    assert metrics.score_suite("gsm8k", preds, refs) == {"accuracy": pytest.approx(200 / 3)}
    # every reference of the shipped test set parses
    suite = load_suite("gsm8k", BUILTIN_SUITES["gsm8k"], str(SHARED / "data"), None)
    assert len(suite.rows) == 1319


# ---------------------------------------------------------------------------------------------------------------
# suites and presets


def test_builtin_suites_load_with_their_sizes_and_several_references():
    sizes = {"dolly": 500, "self-inst": 242, "vicuna": 80, "sinst": 1694, "gsm8k": 1319}
    for name, n in sizes.items():
        s = load_suite(name, BUILTIN_SUITES[name], str(SHARED / "data"), None)
        assert len(s.rows) == n, name
        assert all(r.prompt.endswith("### Response:\n") for r in s.rows), name
    sinst = load_suite("sinst", BUILTIN_SUITES["sinst"], str(SHARED / "data"), 50)
    assert len(sinst.rows) == 50 and all(isinstance(r.references, tuple) for r in sinst.rows)
    assert not any("uinst" in s.path for s in BUILTIN_SUITES.values())  # not the UnNI test set: not built in


def test_bad_suite_rows_name_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "output": "o"}\n{"prompt": "p2"}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: missing field 'output'"):
        load_suite("x", SuiteConfig(path=str(bad)), "", None)
    bad.write_text('{"prompt": "p", "output": ["a", 3]}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: field 'output' must be a string or a non-empty list"):
        load_suite("x", SuiteConfig(path=str(bad)), "", None)
    bad.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: field 'answer': not a GSM8K answer"):
        load_suite("x", SuiteConfig(path=str(bad), metric="gsm8k", prompt_field=None, prompt_template="{question}",
                                    reference_field="answer"), "", None)
    with pytest.raises(DataError, match="set data_root"):
        load_suite("dolly", BUILTIN_SUITES["dolly"], str(tmp_path / "nowhere"), None)


def test_preset_key_covers_what_changes_an_answer_only():
    key = preset_key("protocol", PROTOCOL)
    same = replace(PROTOCOL, generate=replace(PROTOCOL.generate, seeds=[1], batch_size=3, backend="vllm"))
    assert preset_key("protocol", same) == key
    for other in (replace(PROTOCOL, generate=replace(PROTOCOL.generate, temperature=0.7)),
                  replace(PROTOCOL, max_prompt_length=128), replace(PROTOCOL, limit=10)):
        assert preset_key("protocol", other) != key
    q = BUILTIN_PRESETS["quick"]
    assert not q.generate.do_sample and q.generate.seeds == [10] and q.limit == 50


def test_the_protocol_is_the_papers():
    g = PROTOCOL.generate
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.no_repeat_ngram_size) == (True, 1.0, 1.0, 0, 6)
    assert (g.max_new_tokens, PROTOCOL.max_prompt_length, g.seeds) == (256, 256, [10, 20, 30, 40, 50])


# ---------------------------------------------------------------------------------------------------------------
# the protocol's settings reach the backend


def _run_on(model_dir: Path, run: Path) -> Path:
    """A run directory whose final model is `model_dir`: evaluating it writes into `run`, not the shared fixture."""
    run.mkdir()
    (run / "final").symlink_to(model_dir / "final", target_is_directory=True)
    return run


def _suite_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p, "output": "ref answer"}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def test_protocol_settings_reach_the_backend(tiny, tmp_path, monkeypatch):
    from stages import evaluate

    long_prompt = " ".join(f"w{i}" for i in range(600)) + " ### Response:"
    data = _suite_file(tmp_path / "s.jsonl", ["short one", long_prompt])
    calls, opened = [], {}

    class Recorder:
        def generate(self, prompts, s, seed=None, *, keys=None, progress=False, **_):
            calls.append({"prompts": prompts, "s": s, "seed": seed, "keys": keys})
            return [[Completion([7, 8], "an answer", "length")] for _ in prompts]

    @contextlib.contextmanager
    def fake_open(ref, tok, s, *, max_model_len, seed=0):
        opened.update(s=s, max_model_len=max_model_len)
        yield Recorder()

    monkeypatch.setattr(evaluate, "open_generator", fake_open)
    monkeypatch.setattr(evaluate, "max_positions", lambda ref: 4096)
    cfg = EvalConfig(runs=[str(tiny.assets / "student-init")], suites=["s"], preset="protocol",
                     suite_defs={"s": SuiteConfig(path=str(data), id_field="id")}, backend="hf", nll=False)
    evaluate.run(cfg)
    assert [c["seed"] for c in calls] == [10, 20, 30, 40, 50]
    # the teacher answers under the same settings, marked as the ceiling
    calls.clear()
    (student, teacher) = evaluate.run(replace(cfg, teacher=str(_run_on(tiny.teacher, tmp_path / "teacher"))))
    assert (student["role"], teacher["role"]) == ("student", "teacher") and len(calls) == 5  # the student's: stored
    for c in calls:
        s = c["s"]
        assert (s.do_sample, s.temperature, s.top_p, s.top_k, s.no_repeat_ngram_size, s.max_new_tokens) == \
            (True, 1.0, 1.0, 0, 6, 256)
        assert c["keys"] == ["r0", "r1"]
    tok = load_tokenizer(ModelRef(path=str(tiny.assets / "student-init")))
    full = tok.encode(long_prompt, add_special_tokens=False)
    assert len(full) > 256 and calls[0]["prompts"][1] == full[-256:]  # left-truncated: the end is kept
    assert calls[0]["prompts"][0] == tok.encode("short one", add_special_tokens=False)
    assert opened["max_model_len"] == 512
    # a model with fewer positions answers in what is left (the tiny models have 256)
    calls.clear()
    monkeypatch.setattr(evaluate, "max_positions", lambda ref: 300)
    evaluate.run(replace(cfg, preset="p2", presets={"p2": replace(PROTOCOL, generate=replace(PROTOCOL.generate,
                                                                                             seeds=[1]))}))
    assert calls[0]["s"].max_new_tokens == 300 - 256


def test_hf_backend_receives_the_protocols_generation_config(tiny, monkeypatch):
    ref = ModelRef(path=str(tiny.assets / "student-init"))
    model, tok = load_model(ref), load_tokenizer(ref)
    seen = []
    real = model.generate

    def spy(*a, generation_config=None, **k):
        seen.append(generation_config)
        return real(*a, generation_config=generation_config, **k)

    monkeypatch.setattr(model, "generate", spy)
    s = replace(PROTOCOL.generate, max_new_tokens=4)
    HFGenerator(model, tok).generate([[5, 6, 7], [8, 9]], s, 10)
    (g,) = seen
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.no_repeat_ngram_size, g.max_new_tokens) == \
        (True, 1.0, 1.0, 0, 6, 4)
    assert g.repetition_penalty in (None, 1.0)


@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (make install-vllm)")
def test_vllm_backend_receives_the_protocols_sampling_params(tiny):
    from pipeline.generate import NO_REPEAT, VLLMGenerator, request_seed

    got = {}

    class FakeLLM:
        def generate(self, prompts, params, use_tqdm=False):
            got.update(prompts=prompts, params=params)
            return []

    gen = object.__new__(VLLMGenerator)
    gen.tokenizer, gen.llm = load_tokenizer(ModelRef(path=str(tiny.assets / "student-init"))), FakeLLM()
    gen.generate([[5, 6], [7]], PROTOCOL.generate, 20, keys=["a", "b"])
    for p, key in zip(got["params"], ["a", "b"]):
        assert (p.temperature, p.top_p, p.max_tokens, p.seed) == (1.0, 1.0, 256, request_seed(20, key))
        assert p.top_k in (0, -1) and p.extra_args == {NO_REPEAT: 6}  # top-k off; 6-gram ban by the processor


# ---------------------------------------------------------------------------------------------------------------
# NLL, stored results, resume


def test_reference_nll_is_the_token_average_of_log_softmax(tiny):
    from pipeline.evaluate.suites import EvalRow

    ref = ModelRef(path=str(tiny.teacher / "final"))
    model, tok = load_model(ref), load_tokenizer(ref)
    rows = [EvalRow("a", "add 2 and 3", ("5",)), EvalRow("b", "sort c b a please", ("a b c", "x")),
            EvalRow("c", "hi", ("a long reference answer that gets cut",))]
    prompts = [encode_left(tok, r.prompt, 256) for r in rows]
    got = reference_nll(model, tok, prompts, rows, max_new_tokens=5, batch_size=2)
    total, count = 0.0, 0
    with torch.no_grad():
        for p, r in zip(prompts, rows):
            resp = tok.encode(r.references[0], add_special_tokens=False)[:5] + [tok.eos_token_id]
            logp = torch.log_softmax(model(torch.tensor([p + resp])).logits[0].double(), -1)
            for j, t in enumerate(resp):
                total -= float(logp[len(p) + j - 1, t])
                count += 1
    assert got["tokens"] == count and got["nll"] == pytest.approx(total / count, rel=1e-5)


KILLABLE = """
import sys
from pipeline.config import EvalConfig, load_config
from stages import evaluate
if __name__ == "__main__":
    evaluate.run(load_config(EvalConfig, sys.argv[1]))
"""


def test_eval_killed_midway_resumes_at_the_next_unfinished_pair(tiny, tmp_path, monkeypatch):
    from stages import evaluate

    run = _run_on(tiny.teacher, tmp_path / "run")
    cfg = EvalConfig(runs=[str(run)], suites=["train"], preset="p", backend="hf", batch_size=16,
                     suite_defs={"train": SuiteConfig(path=str(tiny.data / "train.jsonl"), reference_field="response",
                                                      id_field="id")},
                     presets={"p": replace(PROTOCOL, max_prompt_length=48,
                                           generate=replace(PROTOCOL.generate, max_new_tokens=48))})
    path = dump_config(cfg, tmp_path / "eval.yaml")
    (tmp_path / "kill.py").write_text(KILLABLE)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "kill.py"), str(path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(run.glob("eval/*/*/*/seed-*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.glob("eval/*/*/*/seed-*.json")}
    assert 1 <= len(done) < 5, f"the kill came too late to test a resume ({len(done)} pairs done)"
    assert not list(run.rglob("*.tmp*"))  # nothing half-written under a result's name

    generated = []
    real_open = evaluate.open_generator

    @contextlib.contextmanager
    def counting_open(*a, **k):
        with real_open(*a, **k) as gen:
            real = gen.generate

            def generate(prompts, s, seed=None, **kw):
                generated.append(seed)
                return real(prompts, s, seed, **kw)

            gen.generate = generate
            yield gen

    monkeypatch.setattr(evaluate, "open_generator", counting_open)
    (res,) = evaluate.run(load_config(EvalConfig, path))
    finished = {int(n[len("seed-"):-len(".json")]) for n in done}
    assert sorted(generated) == sorted({10, 20, 30, 40, 50} - finished)
    for p in run.glob("eval/*/*/*/seed-*.json"):
        if p.name in done:
            assert (p.stat().st_mtime_ns, p.read_bytes()) == done[p.name]  # finished pairs were not redone
    assert set(res["suites"]["train"]["seeds"]) == {"10", "20", "30", "40", "50"}

    # everything stored: a third run generates nothing and loads no model
    generated.clear()
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (again,) = evaluate.run(load_config(EvalConfig, path))
    assert generated == [] and again == res
    assert res["summary"]["train"]["n"] == 5 and res["suites"]["train"]["nll"]["tokens"] > 0


# ---------------------------------------------------------------------------------------------------------------
# report


def _fake_run(root: Path, name: str, scores: dict[str, list[float]], role: str = "student") -> Path:
    """A run directory with stored eval results (two seeds per suite) and a metrics.jsonl."""
    from pipeline.evaluate.suites import checkpoint_hash as ckpt_of

    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 3.0 / s, "ce": 2.0 / s, "lr": 0.1})
                                               + "\n" for s in (1, 2, 3)))
    metric = {"dolly": "rougeL", "gsm8k": "gsm8k"}
    suites = {}
    for suite, vals in scores.items():
        key = metrics.HEADLINE[metric[suite]]
        seeds = {str(seed): {"scores": {key: v}, "lengths": {"mean_tokens": 10.0, "median_tokens": 9,
                                                             "stopped_at_eos": 100.0}, "wall_s": 1.0, "backend": "hf"}
                 for seed, v in zip((10, 20), vals)}
        suites[suite] = {"metric": metric[suite], "key": suite, "n": 4, "max_new_tokens": 256, "seeds": seeds,
                         "nll": {"nll": 1.5, "ppl": 4.4817, "tokens": 40}}
    summary = {"name": name, "role": role, "model": str(run), "checkpoint": ckpt_of(ModelRef(path=str(run))),
               "preset": "protocol", "preset_key": "protocol-x", "suites": suites, "summary": summarise(suites)}
    (run / "eval").mkdir()
    (run / "eval/results-protocol.json").write_text(json.dumps(summary))
    return run


def test_report_of_two_fake_runs_is_exactly_the_table(tmp_path):
    from pipeline.config import ReportConfig
    from stages import report

    a = _fake_run(tmp_path / "runs", "t_to_s__kd_fkl", {"dolly": [20.0, 22.0], "gsm8k": [5.0, 7.0]})
    b = _fake_run(tmp_path / "runs", "t_to_s__dskd_v2_fkl", {"dolly": [25.0, 25.0], "gsm8k": [2.0, 4.0]})
    t = _fake_run(tmp_path / "runs", "t__sft", {"dolly": [30.0, 32.0], "gsm8k": [10.0, 10.0]}, role="teacher")
    out = report.run(ReportConfig(runs=[str(a), str(b), str(t)], out_dir=str(tmp_path / "report")))
    table = """\
| run | dolly | gsm8k (accuracy) |
|---|---:|---:|
| t_to_s__kd_fkl | 21.00 ± 1.41 | **6.00 ± 1.41** |
| t_to_s__dskd_v2_fkl | **25.00 ± 0.00** | 3.00 ± 1.41 |
| t__sft (teacher) | 31.00 ± 1.41 | 10.00 ± 0.00 |"""  # one Rouge-L suite: no "average" repeating it
    text = out.read_text()
    assert table in text
    assert "| t_to_s__kd_fkl | dolly | 1.500 | 4.48 | 10.0 | 9.0 | 100.0 |" in text
    for png in ("scores.png", "curves.png"):
        assert (out.parent / png).stat().st_size > 10_000 and f"]({png})" in text
    assert "Stale" not in text and "No results" not in text
    # a glob finds the same runs; a run without results is named with the command that makes them
    (tmp_path / "runs/new_run").mkdir()
    text = report.run(ReportConfig(runs=[str(tmp_path / "runs/*")], out_dir=str(tmp_path / "r2"))).read_text()
    assert "No results** for preset `protocol`: " in text and "new_run" in text and "make eval RUNS=" in text
    # a checkpoint that changed after its eval is marked stale
    (a / "config.json").write_text("{}")
    assert "**Stale**" in report.run(ReportConfig(runs=[str(a)], out_dir=str(tmp_path / "r3"))).read_text()
    # the results directory of a model an eval config names in `models` (<out_dir>/<name>) is read as it is
    named = tmp_path / "eval-out" / "teacher"
    named.mkdir(parents=True)
    (t / "eval/results-protocol.json").rename(named / "results-protocol.json")
    text = report.run(ReportConfig(runs=[str(a), f"gguf-teacher={named}"], out_dir=str(tmp_path / "r4"))).read_text()
    assert "| gguf-teacher (teacher) | 31.00 ± 1.41 |" in text and "No results" not in text


def test_report_groups_training_seeds_into_one_row(tmp_path):
    """Runs named <name>__seed<N> are one row of the seeds table: mean ± std over training seeds of each run's mean
    over sampling seeds, for exact match, Rouge-L and NLL; the teacher stays a row of its own."""
    from pipeline.config import ReportConfig
    from stages import report

    def run(name, rouge, em, nll, role="student"):
        r = _fake_run(tmp_path / "runs", name, {"dolly": rouge}, role=role)
        res = json.loads((r / "eval/results-protocol.json").read_text())
        for v, e in zip(res["suites"]["dolly"]["seeds"].values(), em):
            v["scores"]["exact_match"] = e
        res["suites"]["dolly"]["nll"]["nll"] = nll
        (r / "eval/results-protocol.json").write_text(json.dumps(res))

    run("kd__seed1", [10.0, 20.0], [40.0, 60.0], 1.0)  # per-run means: Rouge-L 15, EM 50
    run("kd__seed2", [30.0, 30.0], [70.0, 70.0], 2.0)  # 30, 70
    run("sft__seed1", [5.0, 5.0], [10.0, 10.0], 3.0)
    run("sft__seed2", [5.0, 7.0], [10.0, 30.0], 3.5)
    run("teacher", [50.0, 50.0], [90.0, 92.0], 0.5, role="teacher")
    text = report.run(ReportConfig(runs=[str(tmp_path / "runs/*__seed*"), str(tmp_path / "runs/teacher")],
                                   out_dir=str(tmp_path / "report"))).read_text()
    table = """\
| run | training seeds | exact match % | Rouge-L | NLL of the reference |
|---|---:|---:|---:|---:|
| kd | 1, 2 | **60.00 ± 14.14** | **22.50 ± 10.61** | **1.500 ± 0.707** |
| sft | 1, 2 | 15.00 ± 7.07 | 5.50 ± 0.71 | 3.250 ± 0.354 |
| teacher (teacher) | – | 91.00 | 50.00 | 0.500 |"""
    assert "## Over training seeds" in text and table in text, text
    assert (tmp_path / "report/seeds-dolly.png").stat().st_size > 10_000 and "](seeds-dolly.png)" in text
    # without seed suffixes there is no such section
    text = report.run(ReportConfig(runs=[str(tmp_path / "runs/teacher")], out_dir=str(tmp_path / "r2"))).read_text()
    assert "Over training seeds" not in text


def test_eval_expands_globs_in_its_runs_as_report_does(tiny, tmp_path):
    from stages.evaluate import targets

    for name in ("kd__seed1", "kd__seed2", "sft__seed1"):
        (tmp_path / name / "final").mkdir(parents=True)
    cfg = tiny.eval_cfg(tmp_path / "kd__seed1", f"runs=[{tmp_path}/*__seed1, named={tmp_path}/kd__seed2]")
    assert [t.name for t in targets(cfg)] == ["kd__seed1", "sft__seed1", "named"]
    with pytest.raises(ConfigError, match=r"eval: '.*/nothing\*' matches no run directory"):
        targets(tiny.eval_cfg(tmp_path, f"runs=[{tmp_path}/nothing*]"))


def test_report_figures_a_newcomer_can_read(tmp_path):
    """13 runs (4 objectives x 3 training seeds and the teacher), one suite: a colour per objective (its seeds share
    it) and none reused, no repeated "average" column, no gsm8k in the y label without gsm8k, the teacher's long
    curve on its own figure, a 0/1 quantity as its running mean, valid Rouge-L saying what it scores; `make eval`'s
    table has exact match and NLL too."""
    from pipeline.config import ReportConfig
    from pipeline.evaluate.report import (
        TEACHER_COLOR,
        _smooth,
        curve_title,
        metrics_table,
        run_colors,
        score_columns,
        score_label,
    )
    from stages import report

    names = [f"{o}__seed{s}" for o in ("sft", "kd_fkl", "dskd_v2_fkl", "onpolicy_kd_fkl") for s in (10, 11, 12)]
    colors = run_colors([*names, "tiny-teacher__sft"], teachers={"tiny-teacher__sft"})
    assert colors["sft__seed10"] == colors["sft__seed12"] and colors["tiny-teacher__sft"] == TEACHER_COLOR
    assert len({colors[f"{o}__seed10"] for o in ("sft", "kd_fkl", "dskd_v2_fkl", "onpolicy_kd_fkl")} | {TEACHER_COLOR}) == 5
    many = run_colors([f"objective{i}" for i in range(13)])
    assert len(set(many.values())) == 13  # 13 groups: 13 colours (the old cycle of 10 repeated three)

    for i, n in enumerate(names):
        run = _fake_run(tmp_path / "runs", n, {"dolly": [80.0 + i, 81.0 + i]})
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "onpolicy_fraction": s % 2,
                                                                "valid_rougeL": 20.0}) + "\n" for s in range(1, 301)))
    t = _fake_run(tmp_path / "runs", "tiny-teacher__sft", {"dolly": [95.0, 96.0]}, role="teacher")
    (t / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 3001)))
    out = report.run(ReportConfig(runs=[str(tmp_path / "runs/*")], out_dir=str(tmp_path / "report")))
    text = out.read_text()
    results = [json.loads((tmp_path / "runs" / n / "eval/results-protocol.json").read_text()) for n in names]
    assert score_columns(results, ["dolly"]) == ["dolly"] and "| run | dolly |\n" in text
    assert "gsm8k" not in score_label(results, ["dolly"]) and score_label(results, ["dolly"]) == "Rouge-L F × 100"
    for png in ("scores.png", "curves.png", "teacher_curves.png", "seeds-dolly.png"):
        assert (out.parent / png).stat().st_size > 10_000 and f"]({png})" in text
    assert _smooth([0, 1, 0, 1, 0, 1], 2) == [0, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert "running mean" in curve_title("onpolicy_fraction") and "one label" in curve_title("valid_rougeL")
    table = metrics_table(results[:1], "dolly")
    assert table.splitlines()[0] == "| dolly | Rouge-L | NLL of the reference |" and "| sft__seed10 | 80.50 ± 0.71 | 1.500 |" in table


# ---------------------------------------------------------------------------------------------------------------
# representation analysis


def test_structure_distance_is_zero_for_the_same_states_and_grows_with_a_perturbation():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(12, 16, generator=g, dtype=torch.float64)
    assert structure_distance(h, h) == {"cosine_l1": 0.0, "inner_l1": 0.0}
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    wide = torch.cat([h, torch.zeros(12, 8, dtype=torch.float64)], 1) @ q  # the same structure in 24 dimensions
    d = structure_distance(h, 3.0 * wide)  # and at another scale
    assert d["cosine_l1"] < 1e-12 and d["inner_l1"] < 1e-12
    noise = torch.randn(12, 16, generator=g, dtype=torch.float64)
    dists = [structure_distance(h, h + eps * noise) for eps in (0.01, 0.1, 0.3, 1.0, 3.0)]
    for key in ("cosine_l1", "inner_l1"):
        values = [x[key] for x in dists]
        assert values == sorted(values) and values[0] > 0, (key, values)
    cos, inner = structure_matrices(h)
    assert torch.allclose(cos.diagonal(), torch.ones(12, dtype=torch.float64))
    assert float(inner.diagonal().mean()) == pytest.approx(1.0)


def test_a_model_against_its_own_hidden_states_is_at_distance_zero(tiny):
    from types import SimpleNamespace

    from pipeline.evaluate.analysis import student_hidden

    model = load_model(ModelRef(path=str(tiny.teacher / "final")))
    ids = torch.arange(3, 15).numpy()
    row = SimpleNamespace(id="x", student_ids=ids, student_response_start=5, teacher_ids=ids, teacher_response_start=5,
                          align_student=None, align_teacher=None, hidden=None)
    row.hidden = student_hidden(model, row)
    assert representation_distance(model, [row])["cosine_l1"] < 1e-6
    with torch.no_grad():
        model.model.norm.weight.mul_(torch.linspace(0.5, 1.5, model.model.norm.weight.numel()))
    assert representation_distance(model, [row])["cosine_l1"] > 1e-3


@pytest.mark.slow  # two students trained, analysed, evaluated and reported
def test_analyze_eval_and_report_on_trained_students(caches, tmp_path):
    from pipeline.config import ReportConfig
    from stages import analyze, distill, evaluate, report

    kd = distill.run(caches.distill_cfg(f"out_dir={tmp_path}"))
    v2 = distill.run(caches.distill_cfg(f"out_dir={tmp_path}", "loss.objective=dskd_v2"))
    res = analyze.run([str(kd), str(v2)], rows=8)
    for run in (kd, v2):
        a = json.loads((run / "analysis/representation.json").read_text())
        assert a["rows"] == 8 and a["positions"] > 8
        assert a["trained"]["cosine_l1"] > 0 and a["initial"]["cosine_l1"] > 0
        assert (run / "analysis/structure.png").stat().st_size > 10_000
    assert analyze.run([str(kd)], rows=8)[kd.name] == res[kd.name]  # unchanged inputs: not recomputed
    by_pos = res[v2.name]["t2s_agreement_by_position"]  # the projected teacher's agreement per answer position
    assert "t2s_agreement_by_position" not in res[kd.name] and list(by_pos)[0] == "0"
    assert all(0.0 <= v <= 1.0 for v in by_pos.values())
    for run in (kd, v2):
        evaluate.run(caches.eval_cfg(run, "presets.tiny.generate.seeds=[10,20]", "presets.tiny.generate.do_sample=true"))
    out = report.run(ReportConfig(runs=[str(kd), str(v2)], preset="tiny", out_dir=str(tmp_path / "report")))
    text = out.read_text()
    assert f"| {kd.name} | " in text and f"| {v2.name} | " in text and " ± " in text
    assert (out.parent / "representation.png").stat().st_size > 10_000
    assert (out.parent / "diagnostics.png").stat().st_size > 10_000 and "](diagnostics.png)" in text


def test_projector_flags_name_a_projected_teacher_that_does_not_learn():
    from pipeline.evaluate.report import projector_flags

    steps = range(0, 300, 20)
    good = {"t2s_ce": [(s, 6.0 - s / 60) for s in steps], "t2s_agreement": [(s, s / 300) for s in steps]}
    init = {"t2s_init": "plain", "uniform_ce": 5.77}
    assert projector_flags(good, init) == [] and projector_flags({}, None) == []
    high = {**good, "t2s_ce": [(s, 13.0) for s in steps]}
    (flag,) = projector_flags(high, init)
    assert flag.startswith("the projected teacher is not learning: t2s_ce ends at 13.00 nats") and "5.77" in flag
    falling = {**good, "t2s_agreement": [(s, 0.6 - s / 1000) for s in steps]}
    (flag,) = projector_flags(falling, init)
    assert "agreement with the t2s labels falls" in flag and "(0.58 in the first quarter of the logged steps, 0.34 in the last)" in flag
    fit = {"t2s_init": "fit", "uniform_ce": 6.39, "fit_gap_closed": 0.01, "t2s_init_fit_ce": 6.37, "teacher_ce": 1.23}
    (flag,) = projector_flags(good, fit)
    assert flag.startswith("t2s started at the logit-identity fit") and "1% of the way" in flag
    assert projector_flags(good, {**fit, "fit_gap_closed": 0.9}) == []


@pytest.mark.slow  # lm-eval's import and task setup: about a minute on 2 cores
@pytest.mark.skipif(not __import__("pipeline.evaluate.harness", fromlist=["available"]).available(),
                    reason="lm-evaluation-harness is not installed (make install-harness)")
def test_harness_bridge_runs_a_local_task_and_stores_it_with_the_results(tiny, tmp_path, monkeypatch):
    """`--harness` runs an lm-eval task (GSM8K from the local file, 5 rows) on a run's model: its metrics land in
    the results file and the report, and a second eval does not run it again."""
    from pipeline.config import ReportConfig
    from stages import evaluate, report

    task = (ROOT / "configs/harness/gsm8k_local.yaml").read_text()
    include = tmp_path / "tasks"
    include.mkdir()
    # the tiny models have 256 positions: shorter answers; the data file by absolute path
    (include / "gsm8k_local.yaml").write_text(task.replace("max_gen_toks: 256", "max_gen_toks: 16").replace(
        "../shared/data/gsm8k/test.jsonl", str(SHARED / "data/gsm8k/test.jsonl")))
    run = _run_on(tiny.teacher, tmp_path / "run")
    cfg = tiny.eval_cfg(run, "harness=[gsm8k_local]", f"harness_include={include}", "harness_limit=5")
    (res,) = evaluate.run(cfg)
    m = res["harness"]["gsm8k_local"]
    assert 0.0 <= m["exact_match[last-number]"] <= 1.0 and "exact_match_stderr[last-number]" in m
    (stored,) = run.glob("eval/*/harness/gsm8k_local-*.json")
    assert json.loads(stored.read_text())["limit"] == 5
    import pipeline.evaluate.harness as h

    monkeypatch.setattr(h, "run_task", lambda *a, **k: pytest.fail("the task ran again"))
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert evaluate.run(cfg)[0]["harness"] == res["harness"]
    text = report.run(ReportConfig(runs=[str(run)], preset="tiny", out_dir=str(tmp_path / "r"))).read_text()
    assert "## lm-evaluation-harness" in text and "| run | gsm8k_local | exact_match[last-number] |" in text
