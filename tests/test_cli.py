"""What a new user trips over: errors that arrive before anything heavy, quick up-to-date checks, messages that say
what to run, and output that names what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from pipeline.cache.store import CacheError
from pipeline.config import ConfigError, dump_config
from pipeline.data.records import DataError
from stages import distill, teacher_cache
from stages.cli import main as cli
from tests.conftest import ROOT


def _no(what):
    def fail(*a, **k):
        pytest.fail(f"{what} before the error")
    return fail


def test_stage1_reports_bad_data_before_loading_tokenizers_or_the_teacher(caches, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "a", "prompt": "p", "response": "r"}\n{"id": "b", "prompt": "\xff", "response": "r"}\n')
    monkeypatch.setattr(teacher_cache, "load_tokenizer", _no("a tokenizer loaded"))
    monkeypatch.setattr(teacher_cache, "load_model", _no("the teacher loaded"))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        teacher_cache.run(caches.cache_cfg(f"out_dir={tmp_path / 'o'}", f"data.path={bad}"))
    assert not (tmp_path / "o").exists()


def test_stage2_reports_a_missing_cache_and_bad_settings_before_the_engine_starts(caches, tmp_path, monkeypatch):
    monkeypatch.setattr(distill, "init_distributed", _no("DeepSpeed initialised"))
    monkeypatch.setattr(distill, "load_model", _no("the student loaded"))
    real_tokenizer = distill.load_tokenizer
    monkeypatch.setattr(distill, "load_tokenizer", _no("the student's tokenizer loaded"))
    with pytest.raises(CacheError, match=r"nope: neither a teacher cache"):
        distill.run(caches.distill_cfg(f"cache={tmp_path / 'nope'}"))
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"id": "a", "prompt": "p", "response": "r"}\n{"id": "b", "prompt": "p"}\n')
    with pytest.raises(DataError, match=r"sft\.jsonl:2: missing field 'response'"):  # plain SFT: the data first
        distill.run(caches.teacher_sft_cfg(f"data.path={bad}"))
    monkeypatch.setattr(distill, "load_tokenizer", real_tokenizer)
    with pytest.raises(ConfigError, match=r"train\.deepspeed: configs/deepspeed/zero9\.json not found"):
        distill.run(caches.distill_cfg("train.deepspeed=configs/deepspeed/zero9.json"))
    with pytest.raises(ConfigError, match=r"objective 'dskd_eta' is for different tokenizers"):
        distill.run(caches.distill_cfg("loss.objective=dskd_eta"))
    with pytest.raises(ConfigError, match="train.report_to: wandb needs the `wandb` package"):
        distill.run(caches.distill_cfg("train.report_to=[wandb]", f"out_dir={tmp_path / 'runs'}"))
    assert not (tmp_path / "runs").exists()  # no run directory with an empty metrics file
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"train\.grad_accum 1 is not divisible by 2 processes: the global batch"):
        distill.run(caches.distill_cfg("train.grad_accum=1"))


def test_late_errors_now_arrive_before_any_model_or_engine(caches, tmp_path, monkeypatch):
    """An output directory that cannot be written, a student path that is a file, too few rows for a micro-batch, an
    out-of-range divergence setting and a same-vocabulary objective for a student of another tokenizer: one line each, before a model loads or
    DeepSpeed starts (issue 27; they came after 5-55 s, some as tracebacks)."""
    from pipeline.models.load import ModelLoadError

    monkeypatch.setattr(distill, "init_distributed", _no("DeepSpeed initialised"))
    monkeypatch.setattr(distill, "load_model", _no("the student loaded"))
    monkeypatch.setattr(teacher_cache, "load_model", _no("the teacher loaded"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under it, whoever runs the test (root ignores modes)
    with pytest.raises(ConfigError, match=r"cannot be written \(Not a directory\); choose another out_dir") as e:
        distill.run(caches.distill_cfg(f"out_dir={blocker}/runs"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"cannot be written"):
        teacher_cache.run(caches.cache_cfg(f"out_dir={blocker}/cache"))
    with pytest.raises(ModelLoadError, match=r"config\.json is a file, not a model directory; point at its directory"):
        distill.run(caches.distill_cfg(f"student.path={caches.assets}/student-init/config.json"))
    five = tmp_path / "five.jsonl"
    five.write_text("".join(json.dumps({"id": str(i), "prompt": "p", "response": "r"}) + "\n" for i in range(5)))
    with pytest.raises(ConfigError, match=r"five\.jsonl: 5 rows cannot fill one micro-batch of 16 \(train\.micro_batch_size\)"):
        distill.run(caches.teacher_sft_cfg(f"data.path={five}", "valid.every=0", "checkpoint.keep_best=0",
                                           f"out_dir={tmp_path / 'sft'}"))
    with pytest.raises(ConfigError, match=r"loss\.beta must be in \[0, 1\], got 2"):
        caches.distill_cfg("loss.beta=2")
    with pytest.raises(ConfigError, match=r"needs the teacher and the student to share a tokenizer"):
        distill.run(caches.distill_cfg(f"student.path={caches.assets}/student-init-metaspace"))


def test_a_changed_setting_names_itself_and_the_make_flag(caches):
    run_dir = distill.run(caches.distill_cfg("run_name=changed", "train.steps=2"))
    with pytest.raises(ConfigError, match=r"another config \(train\.steps 2 -> 3\).*--force \(make: FORCE=1\)"):
        distill.run(caches.distill_cfg("run_name=changed", "train.steps=3"))
    assert distill.run(caches.distill_cfg("run_name=changed", "train.steps=3"), force=True) == run_dir


QUICK = """
import sys, time
t0 = time.perf_counter()
from stages.cli import main
main(sys.argv[1:], standalone_mode=False)
print(f"torch imported: {'torch' in sys.modules}; {time.perf_counter() - t0:.2f} s")
"""


def test_up_to_date_stages_answer_in_about_a_second_without_torch(caches, tmp_path):
    cache_cfg = dump_config(caches.cache_cfg(), tmp_path / "cache.yaml")
    run_cfg = caches.distill_cfg("run_name=quick", "train.steps=1")
    distill.run(run_cfg)
    teacher_cache.run(caches.cache_cfg())
    for args in (["teacher-cache", "--config", str(cache_cfg)],
                 ["distill", "--config", str(dump_config(run_cfg, tmp_path / "distill.yaml"))]):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", QUICK, *args], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        assert "up to date" in out and "torch imported: False" in out, out
        assert time.perf_counter() - t0 < 5  # the interpreter start included; the check itself well under 1 s
    # a changed input file is noticed (the full check then runs)
    from pipeline import stamps
    from pipeline.cache.schema import SCHEMA_VERSION

    assert stamps.distill_up_to_date(run_cfg) is not None
    assert stamps.teacher_cache_up_to_date(caches.cache_cfg()) is not None
    # a cache of another schema version (built by an older dskd) is not up to date, whatever the stamp says
    manifest = teacher_cache.run(caches.cache_cfg()) / "manifest.json"
    original = manifest.read_text()
    manifest.write_text(original.replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 3'))
    try:
        assert stamps.teacher_cache_up_to_date(caches.cache_cfg()) is None
    finally:
        manifest.write_text(original)
    data = caches.data / "train.jsonl"
    data.touch()
    assert stamps.teacher_cache_up_to_date(caches.cache_cfg()) is None


def test_eval_names_the_run_whole_and_simulate_names_its_files(caches, tmp_path):
    run_dir = distill.run(caches.distill_cfg("run_name=a-rather-long-run-name_to_show__that_it_is_never_cut_kd_fkl",
                                             "train.steps=1"))
    result = CliRunner().invoke(cli, ["eval", "--config", str(dump_config(caches.eval_cfg(run_dir),
                                                                         tmp_path / "eval.yaml"))])
    assert result.exit_code == 0, result.output
    assert "\n| a-rather-long-run-name_to_show__that_it_is_never_cut_kd_fkl | " in result.output
    assert result.output.startswith("eval: ") and "compute thread(s)" in result.output.splitlines()[0]
    from pipeline import cpu

    assert cpu._JOB_FD is None  # its job ended with the command: this test process is not "sharing the machine"
    assert json.loads((run_dir / "eval" / "results-tiny.json").read_text())["suites"]["tiny-test"]["n"] == 16
    result = CliRunner().invoke(cli, ["simulate", "--out", str(tmp_path / "sim"), "--steps", "2", "--repetitions",
                                      "1", "--vocab", "20", "--points", "2", "--divergences", "fkl"])
    assert result.exit_code == 0, result.output
    assert f"simulate: wrote {tmp_path / 'sim' / 'simulation.md'}, {tmp_path / 'sim' / 'simulation.png'}" in result.output
