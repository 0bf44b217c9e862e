"""Config loading: every shipped YAML loads; unknown keys, wrong types and bad overrides are rejected by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.config import (
    AssetsConfig,
    ConfigError,
    DistillConfig,
    EvalConfig,
    OnPolicyConfig,
    PruneConfig,
    RolloutConfig,
    TeacherCacheConfig,
    dump_config,
    load_config,
)
from tests.conftest import CONFIGS

STAGE_OF = {"assets": AssetsConfig, "teacher_sft": DistillConfig, "distill": DistillConfig,
            "eval": EvalConfig,
            "seqkd": DistillConfig, "onpolicy": OnPolicyConfig, "prune": PruneConfig}


def stage_class(path: Path):
    if path.stem.startswith("teacher_cache"):
        return TeacherCacheConfig
    if path.stem.startswith(("distill", "student_sft")):
        return DistillConfig
    if path.stem.startswith("rollout"):
        return RolloutConfig
    return STAGE_OF[path.stem]



# configs/harness holds lm-evaluation-harness task files, not stage configs
ALL_YAML = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "harness")


def test_configs_exist():
    assert len(ALL_YAML) >= 7


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(stage_class(path), path)
    out = dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(type(cfg), out) == cfg


def test_deepspeed_templates_are_json():
    import json

    for p in (CONFIGS / "deepspeed").glob("*.json"):
        assert "zero_optimization" in json.loads(p.read_text())


def write(tmp_path, data) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


BASE = {"student": {"path": "m"}, "out_dir": "o", "data": {"path": "d.jsonl"}}


def test_init_t2s_is_auto_true_or_false_and_projector_lr_follows_lr_by_default(tmp_path):
    from pipeline.config import ConfigError, LossConfig, TrainConfig

    assert LossConfig().init_t2s == "auto" and TrainConfig().projector_lr is None
    for value in ("auto", True, False):
        cfg = load_config(DistillConfig, write(tmp_path, {**BASE, "loss": {"init_t2s": value}}))
        assert cfg.loss.init_t2s == value
    with pytest.raises(ConfigError, match="init_t2s"):
        load_config(DistillConfig, write(tmp_path, {**BASE, "loss": {"init_t2s": "yes"}}))


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, {**BASE, "train": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown key 'train\.stepz'"):
        load_config(DistillConfig, p)


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, {**BASE, "bogus": 1})
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_config(DistillConfig, p)


@pytest.mark.parametrize(
    "section,bad,match",
    [
        ({"train": {"steps": "ten"}}, "train.steps", "must be int"),
        ({"train": {"steps": True}}, "train.steps", "must be int"),
        ({"train": {"lr": "fast"}}, "train.lr", "must be a number"),
        ({"loss": {"divergence": "kl"}}, "loss.divergence", "must be one of"),
        ({"student": "just-a-string"}, "student", "must be a mapping"),
    ],
)
def test_wrong_types_rejected(tmp_path, section, bad, match):
    p = write(tmp_path, {**BASE, **section})
    with pytest.raises(ConfigError, match=rf"c\.yaml.*'{bad}'.*{match}"):
        load_config(DistillConfig, p)


def test_missing_required_key(tmp_path):
    p = write(tmp_path, {"out_dir": "o", "data": {"path": "d"}})
    with pytest.raises(ConfigError, match="missing required key 'student'"):
        load_config(DistillConfig, p)


def test_cross_checks(tmp_path):
    p = write(tmp_path, {**BASE, "loss": {"objective": "kd"}})
    with pytest.raises(ConfigError, match="needs a teacher cache"):
        load_config(DistillConfig, p)
    p = write(tmp_path, {**BASE, "tokenize": {"max_prompt_length": 64, "max_length": 64}})
    with pytest.raises(ConfigError, match="max_prompt_length < max_length"):
        load_config(DistillConfig, p)


def test_overrides_apply_and_parse_yaml_values(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_config(DistillConfig, p, ["train.steps=7", "train.lr=0.5", "loss.divergence=rkl", "run_name=x"])
    assert (cfg.train.steps, cfg.train.lr, cfg.loss.divergence, cfg.run_name) == (7, 0.5, "rkl", "x")
    # YAML 1.1 reads 1e-4 (no dot) as a string; float fields accept it, other strings stay errors
    assert load_config(DistillConfig, p, ["train.lr=1e-4"]).train.lr == 1e-4
    with pytest.raises(ConfigError, match="must be a number"):
        load_config(DistillConfig, p, ["train.lr=1e-4x"])


def test_override_unknown_key_rejected(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=r"--set train\.nope=1.*unknown key 'train\.nope'"):
        load_config(DistillConfig, p, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(DistillConfig, p, ["train.steps"])


def test_cli_reports_config_errors(tmp_path):
    from stages.cli import main

    p = write(tmp_path, BASE)
    result = CliRunner().invoke(main, ["distill", "--config", str(p), "--set", "loss.divergence=kl"])
    assert result.exit_code == 2
    assert "loss.divergence" in result.output and "c.yaml" in result.output


def test_identity_leaves_out_defaults_so_new_settings_keep_old_runs(tmp_path):
    from pipeline.config import config_identity, config_to_dict

    cfg = load_config(DistillConfig, write(tmp_path, {**BASE, "train": {"steps": 7}}))
    ident = config_identity(cfg)
    assert ident == {"student": {"path": "m"}, "out_dir": "o", "data": {"path": "d.jsonl"}, "train": {"steps": 7}}
    # a run whose config.yaml predates a setting (here: the on-policy sections) is the same run
    from pipeline.train.run_dir import what_changed

    run = tmp_path / "run"
    run.mkdir()
    old = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))
    del old["onpolicy"], old["continue_from"], old["train"]["step_offset"]
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    assert what_changed(run, cfg) == "data, cache or student weights (same config)"
    assert "train.steps 7 -> 8" in what_changed(run, load_config(DistillConfig, write(tmp_path, {**BASE, "train": {"steps": 8}})))


def test_tensor_parallel_rollouts_need_vllm():
    from pipeline.config import SamplingConfig

    assert SamplingConfig(backend="vllm", tensor_parallel_size=4).tensor_parallel_size == 4
    assert SamplingConfig(backend="auto", tensor_parallel_size=2).tensor_parallel_size == 2
    for bad in ({"backend": "hf", "tensor_parallel_size": 2}, {"backend": "vllm", "tensor_parallel_size": 0}):
        with pytest.raises(ConfigError, match="tensor_parallel_size"):
            SamplingConfig(**bad)
