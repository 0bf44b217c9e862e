"""The shipped real-pair configs end to end, as a user runs them (the CLI), on a few rows with short sequences:
prune -> teacher-cache -> distill with every objective the pair lists -> eval, plus one on-policy round of the
same-vocabulary pair. Only sizes, paths and step counts are overridden; the objectives, tokenizers, data sources,
prompt templates and cache settings are the configs' own."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from stages.cli import main
from tests.conftest import CONFIGS, SHARED

pytestmark = pytest.mark.slow

SHORT = ["tokenize.max_prompt_length=64", "tokenize.max_length=96"]
STEPS = ["train.steps=1", "train.micro_batch_size=2", "train.grad_accum=1", "train.warmup_steps=0",
         "train.log_every=1", "checkpoint.every=0"]
# a sweep's students are not trained further: no resumable checkpoint (2.4 GB for the 262k-vocabulary student)
SWEEP = [*STEPS, "checkpoint.keep_at_end=false"]
PAIRS = {
    "smollm2-135m_to_smollm2-135m-l10": ["sft", "kd", "dskd_v2"],
    "gemma3-270m_to_smollm2-135m": ["sft", "uld", "mined", "dskd_cma", "overlap_kd", "alm"],
    "smollm2-135m_to_gemma3-270m-l6": ["sft", "uld", "mined", "dskd_eta", "dskd_cma", "alm", "alm_eta"],
}


def _cli(*args: str) -> str:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _small_copy(src, dst, rows: int, rows_also: int):
    """The shipped config with `data.limit` on each source (a few rows of Dolly dev and of GSM8K train)."""
    raw = yaml.safe_load(src.read_text())
    raw["data"]["limit"] = rows
    for more in raw["data"].get("also", []):
        more["limit"] = rows_also
    raw["data"]["path"] = raw["data"]["path"].replace("../shared", str(SHARED))
    for more in raw["data"].get("also", []):
        more["path"] = more["path"].replace("../shared", str(SHARED))
    dst.write_text(yaml.safe_dump(raw))
    return dst


@pytest.mark.parametrize("pair", list(PAIRS))
def test_real_pair_end_to_end(pair, tmp_path):
    cfg = CONFIGS / pair
    student_set = []
    if (cfg / "prune.yaml").exists():
        out = _cli("prune", "--config", str(cfg / "prune.yaml"), "--set", f"out_dir={tmp_path / 'student-init'}")
        assert "kept layers" in out
        student_set = [f"student.path={tmp_path / 'student-init'}"]
    tc = _small_copy(cfg / "teacher_cache.yaml", tmp_path / "teacher_cache.yaml", rows=3, rows_also=3)
    _cli("teacher-cache", "--config", str(tc), "--set", f"out_dir={tmp_path / 'cache'}", "--set", "cache.rows_per_shard=4",
         *[a for s in SHORT for a in ("--set", s)])
    info = json.loads(_cli("cache", "info", str(tmp_path / "cache"), "--json"))
    assert info["rows"] == 6  # 3 Dolly dev rows and 3 GSM8K rows, GSM8K's prompt from the template
    for objective in PAIRS[pair]:
        sets = [*student_set, f"cache={tmp_path / 'cache'}", f"out_dir={tmp_path / 'students'}",
                f"loss.objective={objective}", *SHORT, *SWEEP]
        out = _cli("distill", "--config", str(cfg / "distill.yaml"), *[a for s in sets for a in ("--set", s)])
        run = next((tmp_path / "students").glob(f"{pair}__{objective}*"))
        assert (run / "final" / "config.json").is_file() and not (run / "checkpoints").exists(), out
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(v == v and abs(v) < 1e6 for m in metrics for k, v in m.items() if k.startswith("loss"))
        # the pair's eval config on this student: the five suites, two rows each, greedy
        sets = [f"runs={json.dumps([str(run)])}", "models={}", f"out_dir={tmp_path / 'eval'}",
                f"data_root={SHARED / 'data'}", "presets={q: {limit: 2, generate: {max_new_tokens: 8, do_sample: false, "
                "seeds: [10]}, max_prompt_length: 64}}", "preset=q", "backend=hf"]
        _cli("eval", "--config", str(cfg / "eval.yaml"), *[a for s in sets for a in ("--set", s)])
        results = list((run / "eval").rglob("*.json"))
        assert len({p.parent.name for p in results}) >= 5, run  # a result per suite
        # one student on disk at a time (0.8 GB each for the 262k-vocabulary student, seven of them)
        shutil.rmtree(run / "final")


def test_same_vocabulary_pair_on_policy_round(tmp_path):
    """onpolicy.yaml of the pruned pair: one off-policy round, then one where the student answers and the teacher
    scores those answers in its own process."""
    cfg = CONFIGS / "smollm2-135m_to_smollm2-135m-l10"
    _cli("prune", "--config", str(cfg / "prune.yaml"), "--set", f"out_dir={tmp_path / 'student-init'}")
    tc = _small_copy(cfg / "teacher_cache.yaml", tmp_path / "teacher_cache.yaml", rows=2, rows_also=2)
    distill_set = [f"student.path={tmp_path / 'student-init'}", f"cache={tmp_path / 'cache'}", *SHORT, *STEPS]
    cache_set = [f"out_dir={tmp_path / 'cache'}", *SHORT]
    _cli("teacher-cache", "--config", str(tc), *[a for s in cache_set for a in ("--set", s)])
    sets = [f"distill={cfg / 'distill.yaml'}", f"teacher_cache={tc}", f"out_dir={tmp_path / 'onpolicy'}", "rounds=2",
            "steps_per_round=1", "prompts_per_round=2", "sampling.max_new_tokens=8", "sampling.batch_size=2",
            f"distill_set={json.dumps(distill_set)}", f"teacher_cache_set={json.dumps(cache_set)}"]
    _cli("onpolicy", "--config", str(cfg / "onpolicy.yaml"), *[a for s in sets for a in ("--set", s)])
    assert (tmp_path / "onpolicy" / "round-002" / "cache").is_dir()
    assert list((tmp_path / "onpolicy" / "round-002").rglob("final/config.json"))
