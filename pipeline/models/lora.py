"""LoRA for the student through PEFT: default target modules per architecture family, adapter and merged saving.

An adapter directory holds PEFT's adapter_config.json + adapter_model.safetensors and `base_model.json`, the
student's ModelRef (a GGUF file or a revision cannot be named by PEFT's `base_model_name_or_path` alone), so
`load_student` (and `dskd eval`) can rebuild base + adapter. A merged directory is a plain transformers checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.config import ConfigError, LoraConfig, ModelRef
from pipeline.io_utils import save_pretrained

BASE_MODEL_FILE = "base_model.json"
ADAPTER_CONFIG = "adapter_config.json"

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# config.model_type -> the linear layers adapted by default: attention and MLP projections (not the head)
FAMILY_TARGETS: dict[str, list[str]] = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                                "gemma2", "gemma3", "gemma3_text", "olmo", "olmo2", "granite", "smollm3")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def target_modules(model, cfg: LoraConfig) -> list[str]:
    if cfg.target_modules:
        return list(cfg.target_modules)
    family = model.config.model_type
    if family not in FAMILY_TARGETS:
        raise ConfigError(f"lora: no default target modules for architecture {family!r}; set lora.target_modules "
                          f"(known families: {', '.join(sorted(FAMILY_TARGETS))})")
    return FAMILY_TARGETS[family]


def apply_lora(model, cfg: LoraConfig):
    """The student wrapped in a PeftModel: only the adapters train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = target_modules(model, cfg)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(targets) - present)
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} not found in the student ({model.config.model_type})")
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                              bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_adapter(model, path: Path, base: ModelRef) -> None:
    """The adapter weights and config (PEFT format) and the base model's reference."""
    save_pretrained(model, path)
    (path / BASE_MODEL_FILE).write_text(json.dumps(dataclasses.asdict(base), indent=2) + "\n")


def base_ref(adapter_dir: Path) -> ModelRef:
    """The base model of an adapter: ours (base_model.json), else PEFT's base_model_name_or_path."""
    ours = adapter_dir / BASE_MODEL_FILE
    if ours.is_file():
        return ModelRef(**json.loads(ours.read_text()))
    return ModelRef(path=json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])
