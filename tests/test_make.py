"""The Makefile holds no logic but one: SET reaches only the stage that was named, CACHE_SET the cache step."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT


def dry_run(*args: str) -> list[str]:
    out = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "dskd " in line]


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_set_goes_to_the_named_stage_only():
    lines = dry_run("distill", "SET=loss.divergence=rkl train.steps=5", "CACHE_SET=cache.top_k=8")
    by_stage = {line.split("--config ")[1].split()[0]: line for line in lines}
    assert set(by_stage) == {
        "configs/tiny/assets.yaml", "configs/tiny/teacher_sft.yaml", "configs/tiny/teacher_cache.yaml",
        "configs/tiny/teacher_cache_valid.yaml", "configs/tiny/distill.yaml",
    }
    assert "--set loss.divergence=rkl --set train.steps=5" in by_stage["configs/tiny/distill.yaml"]
    assert "--set cache.top_k=8" in by_stage["configs/tiny/teacher_cache.yaml"]
    assert "--set cache.top_k=8" in by_stage["configs/tiny/teacher_cache_valid.yaml"]
    for stage in ("assets", "teacher_sft", "teacher_cache"):
        assert "loss.divergence" not in by_stage[f"configs/tiny/{stage}.yaml"]

    lines = dry_run("teacher-cache", "SET=cache.top_k=4")  # assets, teacher, the train and the valid cache
    assert [line.rstrip().endswith("--set cache.top_k=4") for line in lines] == [False, False, True, True]
    assert "teacher_cache_valid.yaml" in lines[-1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_sweep_nproc_and_resume_reach_stage_2():
    out = subprocess.run(["make", "-n", "sweep", "DIVERGENCES=fkl js", "OBJECTIVE=dskd", "NPROC=2", "RESUME=1",
                          "SET=train.steps=3"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loop = out[out.index("for d in"):].replace("\\\n", " ")
    assert loop.startswith("for d in fkl js; do")
    assert "torchrun --standalone --nproc_per_node=2 -m stages.cli distill --config configs/tiny/distill.yaml" in loop
    assert "--set loss.objective=dskd --set loss.divergence=$d" in loop and "--resume" in loop
    assert "--set train.steps=3" in loop
    assert "train.steps" not in out[: out.index("for d in")]  # SET reaches the sweep's runs only
