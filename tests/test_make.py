"""The Makefile holds no logic but one: SET reaches only the stage that was named, CACHE_SET the cache step."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT


def dry_run(*args: str, checks: bool = False) -> list[str]:
    """The `dskd` command lines make would run: the stages', or (`checks`) the config checks that come first."""
    out = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "dskd " in line and ("dskd check " in line) == checks]


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_set_goes_to_the_named_stage_only():
    lines = dry_run("distill", "SET=loss.divergence=rkl train.steps=5", "CACHE_SET=cache.top_k=8")
    by_stage = {line.split("--config ")[1].split()[0]: line for line in lines}
    assert set(by_stage) == {
        "configs/tiny/assets.yaml", "configs/tiny/teacher_sft.yaml", "configs/tiny/teacher_cache.yaml",
        "configs/tiny/teacher_cache_valid.yaml", "configs/tiny/student_sft.yaml", "configs/tiny/distill.yaml",
    }
    assert "--set loss.divergence=rkl --set train.steps=5" in by_stage["configs/tiny/distill.yaml"]
    assert "--set cache.top_k=8" in by_stage["configs/tiny/teacher_cache.yaml"]
    assert "--set cache.top_k=8" in by_stage["configs/tiny/teacher_cache_valid.yaml"]
    for stage in ("assets", "teacher_sft", "teacher_cache", "student_sft"):
        assert "loss.divergence" not in by_stage[f"configs/tiny/{stage}.yaml"]

    lines = dry_run("teacher-cache", "SET=cache.top_k=4")  # assets, teacher, the train and the valid cache
    assert [line.rstrip().endswith("--set cache.top_k=4") for line in lines] == [False, False, True, True]
    assert "teacher_cache_valid.yaml" in lines[-1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_configs_and_set_are_checked_before_the_first_stage(tmp_path):
    out = subprocess.run(["make", "-n", "distill", "SET=loss.divergence=rkl", "FORCE=1"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    first_stage = next(i for i, line in enumerate(out) if "dskd assets" in line)
    checks = [i for i, line in enumerate(out) if "dskd check " in line]
    assert checks and max(checks) < first_stage
    (distill_check,) = [out[i] for i in checks if "configs/tiny/distill.yaml" in out[i]]
    assert "--set loss.divergence=rkl" in distill_check
    # FORCE reaches the student's run only, not the teacher's SFT run
    (teacher,) = [line for line in out if "teacher_sft.yaml" in line and "dskd check" not in line]
    (student,) = [line for line in out if "configs/tiny/distill.yaml" in line and "dskd check" not in line]
    assert "--force" in student and "--force" not in teacher
    # a typo in SET fails in the check, in well under the seconds a stage takes
    bad = subprocess.run([str(ROOT / ".venv/bin/dskd"), "check", "--stage", "distill", "--config",
                          str(ROOT / "configs/tiny/distill.yaml"), "--set", "loss.divergenc=rkl"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown key 'loss.divergenc'" in bad.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_check_applies_set_and_a_target_that_takes_none_refuses_it():
    """`make check SET=...` exited 0 without applying SET (issue 27): it validates it against distill.yaml, so a
    bad value or a misspelt key fails; a target that takes no SET refuses one instead of ignoring it."""
    (line,) = [x for x in dry_run("check", "SET=loss.alpha=0.3", checks=True) if "configs/tiny/distill.yaml" in x]
    assert line.rstrip().endswith("--set loss.alpha=0.3")
    for bad, why in (("loss.alpha=1.5", "loss.alpha must be in [0, 1], got 1.5"), ("loss.alfa=1", "unknown key 'loss.alfa'")):
        run = subprocess.run(["make", "check", f"SET={bad}"], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode != 0 and why in run.stderr
    for target in ("report", "test", "bench-alignment"):
        run = subprocess.run(["make", "-n", target, "SET=loss.alpha=0.3"], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode != 0 and "is applied by the targets of stages" in run.stderr and f"'{target}'" in run.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_eval_takes_globs_in_runs_as_report_does():
    """`make eval RUNS="runs/x/*__seed1*"` failed with "Got unexpected extra arguments": the shell expanded the glob
    after one --run. Passed quoted, dskd eval expands it as dskd report does."""
    (line,) = dry_run("eval", "RUNS=runs/tiny/demo/*__seed1* other")
    assert "--run 'runs/tiny/demo/*__seed1*' --run 'other'" in line


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_sweep_nproc_and_resume_reach_stage_2():
    out = subprocess.run(["make", "-n", "sweep", "DIVERGENCES=fkl js", "OBJECTIVE=dskd", "NPROC=2", "RESUME=1",
                          "SET=train.steps=3"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    loop = out[out.index("for d in"):].replace("\\\n", " ")
    assert loop.startswith("for d in fkl js; do")
    assert "torchrun --standalone --nproc_per_node=2 -m stages.cli distill --config configs/tiny/distill.yaml" in loop
    assert "--set loss.objective=dskd --set loss.divergence=$d" in loop and "--resume" in loop
    assert "--set train.steps=3" in loop
    stages = [line for line in out[: out.index("for d in")].splitlines() if "dskd check" not in line]
    assert stages and not any("train.steps" in line for line in stages)  # SET reaches the sweep's runs only


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_onpolicy_rounds_and_set_reach_the_onpolicy_stage():
    lines = dry_run("onpolicy", "ROUNDS=2", "SET=mix=0.25")
    (stage,) = [line for line in lines if "dskd onpolicy" in line]
    assert "--set rounds=2" in stage and "--set mix=0.25" in stage
    assert any("teacher_cache.yaml" in line for line in lines)  # the gold cache comes first
    (check,) = [line for line in dry_run("onpolicy", "ROUNDS=2", checks=True) if "onpolicy.yaml" in line]
    assert "--set rounds=2" in check


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_demo_trains_every_student_per_seed_then_evaluates_and_reports_them_all():
    """`make demo`'s loop, run with `dskd` replaced by echo: per training seed the student SFT'd from scratch, from it
    sft / kd / dskd / dskd_v2 and an on-policy student, from the random initialisation kd and dskd_v2, all named
    <name>__seed<N>; SET reaches the demo's distill runs only."""
    out = subprocess.run(["make", "-n", "demo", "DEMO_SEEDS=1 2", "DEMO_DIR=d", "DSKD=echo dskd", "SET=train.steps=3"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    start = out.index("set -e; for s in")
    loop = out[start : out.index("\ndone\n", start) + len("\ndone")]
    ran = subprocess.run(["bash", "-c", loop], capture_output=True, text=True, check=True)
    lines = ran.stdout.splitlines()
    assert len(lines) == 2 * 8
    for seed in (1, 2):
        (start,) = [x for x in lines if f"run_name=student-sft__seed{seed}" in x]
        assert "student_sft.yaml" in start and f"--set train.seed={seed}" in start and "train.steps" not in start
        for run in ("sft", "kd", "dskd", "dskd_v2", "scratch-kd", "scratch-dskd_v2"):
            (line,) = [x for x in lines if f"run_name={run}__seed{seed}" in x]
            assert f"--set train.seed={seed}" in line and "--set out_dir=d " in line and "--set train.steps=3" in line
            assert f"--set loss.objective={run.removeprefix('scratch-')} " in line
            start_from = "runs/tiny/assets/student-init" if run.startswith("scratch") else f"d/student-sft__seed{seed}/final"
            assert f"--set student.path={start_from} " in line
        (on,) = [x for x in lines if f"out_dir=d/onpolicy_kd__seed{seed}" in x]
        assert on.startswith("dskd onpolicy") and f"train.seed={seed}," in on and f"--set seed={seed}" in on
        assert f"student.path=d/student-sft__seed{seed}/final]" in on and "train.steps" not in on
    after = out[out.index("dskd eval"):]
    assert after.count("--run d/") == 2 * 8 and "--preset protocol" in after
    assert "dskd report 'd/student-sft__seed*' 'd/sft__seed*' 'd/kd__seed*'" in after and "--out d/report" in after


@pytest.mark.parametrize("xtok", ["xtok", "pieces"])
def test_demo_xtok_trains_every_cross_tokenizer_objective_per_seed_from_the_xtok_cache(xtok):
    """`make demo-xtok`'s loop with `dskd` replaced by echo: per seed the student SFT'd from scratch, from it one
    student per objective, from the random initialisation one per XTOK_SCRATCH, named <name>__seed<N> (the shell must
    not read `$o__seed` as one variable), then eval and report of them all; XTOK picks the student tokenizer."""
    out = subprocess.run(["make", "-n", "demo-xtok", f"XTOK={xtok}", "DEMO_SEEDS=1 2", "XTOK_DIR=x", "DSKD=echo dskd",
                          "XTOK_OBJECTIVES=sft alm", "XTOK_SCRATCH=alm_eta"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert f"dskd teacher-cache --config configs/tiny/teacher_cache_{xtok}.yaml" in out
    start = out.index("set -e; for s in")
    loop = out[start : out.index("\ndone\n", start) + len("\ndone")]
    lines = subprocess.run(["bash", "-c", loop], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(lines) == 2 * 4
    init = "runs/tiny/assets/student-init-" + ("metaspace" if xtok == "xtok" else "pieces")
    for seed in (1, 2):
        (start,) = [x for x in lines if f"--set run_name=student-sft__seed{seed}" in x]
        assert f"student_sft_{xtok}.yaml" in start
        for objective in ("sft", "alm", "scratch-alm_eta"):
            (line,) = [x for x in lines if f"--set run_name={objective}__seed{seed}" in x]
            assert f"distill_{xtok}.yaml" in line and f"--set loss.objective={objective.removeprefix('scratch-')} " in line
            assert f"--set train.seed={seed}" in line and "--set out_dir=x " in line
            assert f"--set student.path={init if 'scratch' in objective else f'x/student-sft__seed{seed}/final'} " in line
    after = out[out.index("dskd eval"):]
    assert after.count("--run x/") == 2 * 4 and "dskd report 'x/student-sft__seed*' 'x/sft__seed*' 'x/alm__seed*'" in after


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_distill_runs_the_student_sft_first_when_the_config_set_has_one():
    lines = dry_run("distill")
    stages = [line.split("--config ")[1].split()[0] for line in lines]
    assert stages.index("configs/tiny/student_sft.yaml") < stages.index("configs/tiny/distill.yaml")
    # a config set without one distils its student as it is
    real = [line.split("--config ")[1].split()[0] for line in dry_run("distill", "CONFIGS=configs/gemma3-270m_to_smollm2-135m")]
    assert not any("student_sft" in c for c in real)


def test_every_make_target_the_readme_and_docs_name_exists():
    import re

    readme = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    # every "make <word>" anywhere in the README and docs/, prose included: a reader takes it for a command
    named = set(re.findall(r"\bmake ([a-z][a-z0-9-]*)", readme))
    rules = set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert named and named <= rules, sorted(named - rules)
