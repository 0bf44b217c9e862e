"""DSKD on the built-in default at its real size (the shipped configs, outputs in a temporary directory): the
projector initialisation and the labels that issue 23 found wrong, checked where they went wrong.

- the cross-tokenizer cache labels every first response word (was 0 of 295 exact pairs: a byte-level teacher spells
  the first word without the leading space that a SentencePiece student's token carries);
- dskd_v2 from the random student with `init_t2s: true` (the logit-identity fit through a random head) is flagged by
  `dskd report`, the same run with `auto` (which starts plain there) is not.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import AssetsConfig, DistillConfig, TeacherCacheConfig, load_config
from pipeline.evaluate.report import projector_flags, read_curves
from pipeline.objectives.setup import T2S_INIT_FILE
from tests.conftest import CONFIGS, student_reader

pytestmark = pytest.mark.slow  # the default's teacher (3,000 steps) and two 300-step students: about 3 minutes


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    from stages import assets, distill

    root = tmp_path_factory.mktemp("default")
    assets.run(load_config(AssetsConfig, CONFIGS / "tiny/assets.yaml",
                           [f"data_dir={root}/data", f"out_dir={root}/assets"]))
    distill.run(load_config(DistillConfig, CONFIGS / "tiny/teacher_sft.yaml", [
        f"student.path={root}/assets/teacher-init", f"data.path={root}/data/train.jsonl", f"out_dir={root}/teachers",
        f"valid.data.path={root}/data/valid.jsonl", "checkpoint.keep_at_end=false"]))
    return root


def cache(root, name: str, *extra: str):
    from stages import teacher_cache

    return teacher_cache.run(load_config(TeacherCacheConfig, CONFIGS / f"tiny/{name}", [
        f"data.path={root}/data/train.jsonl", f"teacher.path={root}/teachers/tiny-teacher__sft/final",
        f"out_dir={root}/{name}", *extra]))


def test_every_first_response_word_of_the_cross_tokenizer_cache_has_a_label(default):
    reader = student_reader(cache(default, "teacher_cache_xtok.yaml",
                                  f"student_tokenizer.path={default}/assets/tokenizer-metaspace"),
                            default / "assets/tokenizer-metaspace")
    first = labelled = 0
    for i in range(len(reader)):
        row = reader[i]
        at_first = row.align_student == row.student_response_start - 1
        first += int(at_first.sum())
        labelled += int((row.align_label[at_first] != -100).sum())
    assert first == len(reader) == 300 and labelled == first  # schema 4: 0 of 295 (issue 23)
    pairs = sum(len(reader[i].align_label) for i in range(len(reader)))
    usable = sum(int((reader[i].align_label != -100).sum()) for i in range(len(reader)))
    assert usable == pairs  # whole words on both sides: every pair's teacher top-1 is a student token


def test_report_flags_the_fit_through_a_random_head_and_not_auto(default):
    from stages import distill

    same = cache(default, "teacher_cache.yaml")
    runs = {}
    for init in ("true", "auto"):
        runs[init] = distill.run(load_config(DistillConfig, CONFIGS / "tiny/distill.yaml", [
            f"student.path={default}/assets/student-init", f"cache={same}", f"out_dir={default}/students",
            f"run_name=dskd_v2_{init}", "loss.objective=dskd_v2", f"loss.init_t2s={init}", "valid.every=0",
            "checkpoint.every=0", "checkpoint.keep_best=0", "checkpoint.keep_at_end=false"]))
    flags = {}
    for init, run in runs.items():
        report = json.loads((run / T2S_INIT_FILE).read_text())
        flags[init] = projector_flags(read_curves(run), report)
    auto = json.loads((runs["auto"] / T2S_INIT_FILE).read_text())
    assert auto["t2s_init"] == "plain" and auto["fit_gap_closed"] < 0.1  # the fit goes nowhere through a random head
    assert flags["auto"] == []
    assert any(f.startswith("t2s started at the logit-identity fit") for f in flags["true"]), flags["true"]
    # the start matters: the plain projected teacher agrees with its labels earlier and more
    curves = {init: dict(read_curves(run)["t2s_agreement"]) for init, run in runs.items()}
    assert np.mean(list(curves["auto"].values())) > np.mean(list(curves["true"].values()))
