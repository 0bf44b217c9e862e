"""Pinned CPU kernels (pipeline/cpu.py): the variables each setting sets, and the same weights whatever instruction
set and thread count the machine's libraries would pick by themselves."""

from __future__ import annotations

import hashlib
import os
import subprocess

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


def test_make_pins_the_tiny_default_and_not_the_benchmarks():
    def exported(*args):
        out = subprocess.run(["make", "-n", "-p", *args], cwd=ROOT, capture_output=True, text=True).stdout
        return {line.split(" := ")[0]: line.split(" := ")[1] if " := " in line else ""
                for line in out.splitlines() if line.startswith("DSKD_CPU_")}

    assert exported("distill") == {"DSKD_CPU_ISA": "avx2", "DSKD_CPU_THREADS": "2"}
    assert exported("distill", "CONFIGS=configs/gemma3-270m_to_smollm2-135m") == {"DSKD_CPU_ISA": "", "DSKD_CPU_THREADS": ""}
    bench = subprocess.run(["make", "-n", "bench-alignment"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "DSKD_CPU_ISA= DSKD_CPU_THREADS= .venv/bin/python bench/alignment.py" in bench


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
