"""Pinned CPU kernels (pipeline/cpu.py): the variables each setting sets, and the same weights whatever instruction
set and thread count the machine's libraries would pick by themselves."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from pipeline import cpu
from tests.conftest import ROOT


def test_pin_sets_every_librarys_choice_and_overrides_the_environment():
    env = {"DSKD_CPU_ISA": "AVX2", "DSKD_CPU_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx512", "OMP_NUM_THREADS": "16"}
    assert cpu.pin(env) == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                            "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["OMP_NUM_THREADS"] == "2"
    untouched = {"ATEN_CPU_CAPABILITY": "avx512", "DSKD_CPU_ISA": "", "DSKD_CPU_THREADS": ""}
    assert cpu.pin(untouched) == {} and untouched["ATEN_CPU_CAPABILITY"] == "avx512"  # empty: the libraries choose
    for bad in ({"DSKD_CPU_ISA": "sse2"}, {"DSKD_CPU_THREADS": "0"}, {"DSKD_CPU_THREADS": "two"}):
        with pytest.raises(cpu.CpuPinError, match="DSKD_CPU_"):
            cpu.pin(bad)


def test_the_allocator_setting_keeps_freed_memory_unless_asked_for_glibcs_default():
    assert cpu.malloc_setting({}) == "keep" and cpu.malloc_setting({"DSKD_CPU_MALLOC": ""}) == "keep"
    assert cpu.keep_freed_memory({"DSKD_CPU_MALLOC": "default"}) is False  # mallopt is not called
    with pytest.raises(cpu.CpuPinError, match="DSKD_CPU_MALLOC='tcmalloc': expected one of keep, default"):
        cpu.configure("distill", {"DSKD_CPU_MALLOC": "tcmalloc"})


def test_make_pins_the_tiny_default_and_not_the_benchmarks():
    def exported(*args):
        out = subprocess.run(["make", "-n", "-p", *args], cwd=ROOT, capture_output=True, text=True).stdout
        return {line.split(" := ")[0]: line.split(" := ")[1] if " := " in line else ""
                for line in out.splitlines() if line.startswith("DSKD_CPU_")}

    assert exported("distill") == {"DSKD_CPU_ISA": "avx2", "DSKD_CPU_THREADS": "2"}
    assert exported("distill", "CONFIGS=configs/gemma3-270m_to_smollm2-135m") == {"DSKD_CPU_ISA": "", "DSKD_CPU_THREADS": ""}
    bench = subprocess.run(["make", "-n", "bench-alignment"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "DSKD_CPU_ISA= DSKD_CPU_THREADS= .venv/bin/python bench/alignment.py" in bench


def test_threads_follow_the_pin_then_omp_num_threads_then_the_affinity_mask():
    env = {"DSKD_CPU_THREADS": "3", "OMP_NUM_THREADS": "5"}
    assert cpu.choose_threads(env)[0] == 3 and env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    env = {"OMP_NUM_THREADS": "5"}  # torchrun's 1 per rank, or the user's
    assert cpu.choose_threads(env) == (5, "OMP_NUM_THREADS") and env["MKL_NUM_THREADS"] == "5"
    env = {}
    assert cpu.choose_threads(env) == (len(os.sched_getaffinity(0)), "the cores this process may use")
    one_core = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                               "from pipeline import cpu; print(cpu.choose_threads({})[0])"],
                              cwd=ROOT, capture_output=True, text=True, check=True)
    assert one_core.stdout.strip() == "1"  # the affinity mask, not the machine's cores


JOB = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline import cpu
    cpu.jobs_dir = lambda: Path(sys.argv[1])
    cpu.register_job("distill")
    print("registered", flush=True)
    time.sleep(60)
""")


def test_a_job_sees_the_others_running_and_waits_without_spinning(tmp_path, monkeypatch):
    """Two 2-thread jobs on 2 cores ran a step 25x slower while libgomp's threads spun for siblings another process
    had descheduled: a job that starts while another runs says so and spin-waits briefly (unless the user chose)."""
    monkeypatch.setattr(cpu, "jobs_dir", lambda: tmp_path)
    monkeypatch.setattr(cpu, "_JOB_FD", None)
    env = {}
    assert "sharing" not in cpu.configure("eval", env) and "GOMP_SPINCOUNT" not in env  # alone: the library default
    other = subprocess.Popen([sys.executable, "-c", JOB, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "registered"
        env = {"DSKD_CPU_THREADS": "2"}
        line = cpu.configure("eval", env)
        assert line.startswith("eval: 2 compute thread(s) (DSKD_CPU_THREADS, pinned for reproducibility; ")
        assert f"sharing the machine with distill (pid {other.pid})" in line and env["GOMP_SPINCOUNT"] == "1000"
        chosen = {"OMP_WAIT_POLICY": "active"}
        assert "sharing" in cpu.configure("eval", chosen) and "GOMP_SPINCOUNT" not in chosen  # the user's choice
    finally:
        other.kill()
        other.wait()
    assert "sharing" not in cpu.configure("eval", {})  # it ended: its file is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(os.getpid())]
    cpu.end_job()  # a command inside a longer-lived process (CliRunner) ends its job with the command
    assert list(tmp_path.iterdir()) == [] and cpu._JOB_FD is None


def _machine_isas() -> list[str]:
    import torch

    return ["avx512", "avx2"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else ["avx2"]


@pytest.mark.slow
def test_the_defaults_first_steps_give_the_same_weights_under_two_isa_settings(caches, tmp_path):
    """`dskd distill` on the tiny chain's cache, 20 steps, run as a machine with AVX-512 (torch's and MKL's own
    choice there, 1 thread) and as one with AVX2 only (2 threads): with DSKD_CPU_ISA=avx2 and DSKD_CPU_THREADS=2 the
    student's weights are the same bit for bit; unpinned they are not (where this CPU has AVX-512)."""
    tiny = caches
    machines = {
        "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                   "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                 "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    }
    cfg = tiny.distill_cfg()

    def weights(name: str, machine: str, pinned: bool) -> str:
        env = {**os.environ, **machines[machine], "DSKD_CPU_ISA": "avx2" if pinned else "",
               "DSKD_CPU_THREADS": "2" if pinned else ""}
        sets = [f"student.path={cfg.student.path}", f"cache={cfg.cache}", f"out_dir={tmp_path}", f"run_name={name}",
                "loss.objective=dskd_v2", "train.steps=20", "train.micro_batch_size=8", "valid.every=0",
                "checkpoint.every=0", "checkpoint.keep_best=0", "checkpoint.keep_at_end=false",
                "tokenize.max_prompt_length=48", "tokenize.max_length=64"]
        cmd = [str(ROOT / ".venv/bin/dskd"), "distill", "--config", str(ROOT / "configs/tiny/distill.yaml")]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        return hashlib.sha256((tmp_path / name / "final" / "model.safetensors").read_bytes()).hexdigest()

    pinned = {m: weights(f"pinned-{m}", m, True) for m in machines}
    assert pinned["avx512"] == pinned["avx2"]
    if _machine_isas() == ["avx512", "avx2"]:
        assert weights("free-avx512", "avx512", False) != pinned["avx2"]  # the pin is what makes them equal
