"""The papers' setups (configs/papers/*) as a GPU user runs them: teacher SFT -> teacher cache -> student. The hub is
out of reach here, so the models are the tiny default's (same roles: a teacher, and for the cross-tokenizer pair a
student with another tokenizer) and Dolly rows are written in the hub dataset's schema (instruction, context,
response); everything else is the configs' own but sizes, the precision (fp32 on a CPU) and the DeepSpeed stage."""

from __future__ import annotations

import json

import pytest

from pipeline.config import DistillConfig, TeacherCacheConfig, load_config
from stages import distill, teacher_cache
from tests.conftest import CONFIGS, SHARED

PAPERS = sorted(p.name for p in (CONFIGS / "papers").iterdir())
CPU = ["train.steps=1", "train.micro_batch_size=2", "train.grad_accum=1", "train.precision=fp32",
       "train.deepspeed=configs/deepspeed/zero0.json", "train.log_every=1", "checkpoint.every=0",
       "tokenize.max_prompt_length=48", "tokenize.max_length=64"]


def test_every_paper_setup_names_hub_models_and_gpu_settings():
    for name in PAPERS:
        sft = load_config(DistillConfig, CONFIGS / "papers" / name / "teacher_sft.yaml")
        student = load_config(DistillConfig, CONFIGS / "papers" / name / "distill.yaml")
        cache = load_config(TeacherCacheConfig, CONFIGS / "papers" / name / "teacher_cache.yaml")
        for ref in (sft.student, student.student):
            assert "/" in ref.path and not ref.path.startswith(("runs", "pypi:"))  # a hub name
        assert sft.train.precision == student.train.precision == "bf16" and cache.teacher.dtype == "bfloat16"
        assert cache.teacher.path == f"{sft.out_dir}/{sft.run_name}/final"  # stage 1 reads the SFT'd teacher
        assert student.cache == cache.out_dir
        assert (cache.student_tokenizer is not None) == (student.loss.objective == "dskd_eta")


@pytest.mark.parametrize("name", PAPERS)
def test_paper_setup_runs_with_stand_in_models(name, tiny, tmp_path):
    rows = [json.loads(line) for line in (SHARED / "data/minillm_eval/dolly/dev.jsonl").read_text().splitlines()[:6]]
    data = tmp_path / "dolly.jsonl"  # the hub dataset's field names
    data.write_text("".join(json.dumps({"instruction": r["instruction"], "context": r["input"], "response": r["output"]})
                            + "\n" for r in rows))
    cfg = CONFIGS / "papers" / name
    sft = load_config(DistillConfig, cfg / "teacher_sft.yaml", [
        f"student.path={tiny.teacher}/final", f"data.path={data}", f"out_dir={tmp_path / 'teachers'}", *CPU,
        "lora.r=4"])
    teacher = distill.run(sft)
    cross = "tinyllama" in name
    cache_cfg = load_config(TeacherCacheConfig, cfg / "teacher_cache.yaml", [
        f"data.path={data}", f"teacher.path={teacher}/final", f"out_dir={tmp_path / 'cache'}", "teacher.dtype=float32",
        "tokenize.max_prompt_length=48", "tokenize.max_length=64",
        *([f"student_tokenizer.path={tiny.assets}/tokenizer-metaspace"] if cross else [])])
    cache = teacher_cache.run(cache_cfg)
    student = tiny.assets / ("student-init-metaspace" if cross else "student-init")
    run = distill.run(load_config(DistillConfig, cfg / "distill.yaml", [
        f"student.path={student}", f"cache={cache}", f"out_dir={tmp_path / 'students'}", *CPU]))
    assert (run / "final" / "config.json").is_file()
