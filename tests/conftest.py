"""Shared fixtures: the shipped tiny-default configs, scaled down and redirected into a temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.cpu import pin

# `make test` exports the tiny default's kernel pin (DSKD_CPU_ISA, and DSKD_CPU_THREADS=1: one thread per test worker):
# applied here, before torch is imported, this process runs the kernels its child `dskd` processes run, so in-process
# and subprocess runs compare
pin()

from pipeline.config import AssetsConfig, DistillConfig, EvalConfig, TeacherCacheConfig, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# real tokenizers and data sets beside the repository (CI clones with shared/ next to it); DSKD_SHARED overrides
SHARED = Path(os.environ.get("DSKD_SHARED", ROOT.parent / "shared")).resolve()
if not (SHARED / "tokenizers").is_dir():
    raise RuntimeError(f"{SHARED}: the shared tokenizers/data folder is missing; set DSKD_SHARED to its path")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config):
    """Free disk where the tests write: a full disk fails every test after it (a CI run once did)."""
    import shutil
    import tempfile

    where = Path(tempfile.gettempdir())
    return (f"free disk: {shutil.disk_usage(where).free / 2**30:.1f} GB at {where} (the slow real-model tests hold "
            "up to about 3 GB at once there per test worker, and 1.6 GB of converted GGUF models under ~/.cache/dskd)")

# small sizes so the whole chain runs in seconds; the structure is the shipped one
SMALL_MODEL = ["hidden_size=64", "num_layers=1", "num_heads=1", "num_kv_heads=1", "intermediate_size=96"]  # head_dim 64 (vLLM)
TOKENIZE = ["tokenize.max_prompt_length=48", "tokenize.max_length=64"]


def _models_overrides() -> list[str]:
    out = []
    for name in ("teacher-init", "student-init", "student-init-metaspace", "student-init-pieces"):
        out += [f"models.{name}.{kv}" for kv in SMALL_MODEL]
    return out


class TinyDefault:
    """Paths and config loaders for one scaled-down copy of configs/tiny under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.assets = root / "assets"
        self.teacher = root / "teachers" / "tiny-teacher__sft"
        self.cache = root / "cache"
        self.valid_cache = root / "cache-valid"
        self.students = root / "students"

    def assets_cfg(self, *extra: str) -> AssetsConfig:
        return load_config(
            AssetsConfig,
            CONFIGS / "tiny/assets.yaml",
            [f"data_dir={self.data}", f"out_dir={self.assets}", "task.n_train=160", "task.n_valid=16",
             "task.n_test=16", *_models_overrides(), *extra],
        )

    def teacher_sft_cfg(self, *extra: str) -> DistillConfig:
        return load_config(
            DistillConfig,
            CONFIGS / "tiny/teacher_sft.yaml",
            [f"student.path={self.assets}/teacher-init", f"data.path={self.data}/train.jsonl",
             f"out_dir={self.root}/teachers", "train.steps=4", "train.micro_batch_size=16", "train.log_every=2",
             f"valid.data.path={self.data}/valid.jsonl", "valid.every=2", "checkpoint.every=2", *TOKENIZE, *extra],
        )

    def cache_cfg(self, *extra: str, name: str = "teacher_cache.yaml") -> TeacherCacheConfig:
        student_tok = [f"student_tokenizer.path={self.assets}/tokenizer-metaspace"] if "xtok" in name else []
        split = "valid" if "valid" in name else "train"
        return load_config(
            TeacherCacheConfig,
            CONFIGS / "tiny" / name,
            [f"data.path={self.data}/{split}.jsonl", f"teacher.path={self.teacher}/final", f"out_dir={self.cache}",
             "cache.rows_per_shard=64", "cache.batch_size=16", *student_tok, *TOKENIZE, *extra],
        )

    def valid_cache_cfg(self, *extra: str) -> TeacherCacheConfig:
        return self.cache_cfg(f"out_dir={self.valid_cache}", *extra, name="teacher_cache_valid.yaml")

    def distill_cfg(self, *extra: str) -> DistillConfig:
        """The shipped distill config, scaled down; validation and intermediate checkpoints off unless asked for
        (valid.cache points at `valid_cache`, built by `valid_cache_cfg`)."""
        return load_config(
            DistillConfig,
            CONFIGS / "tiny/distill.yaml",
            [f"student.path={self.assets}/student-init", f"cache={self.cache}", f"out_dir={self.students}",
             "train.steps=4", "train.micro_batch_size=8", "train.grad_accum=2", "train.log_every=2",
             f"valid.cache={self.valid_cache}", "valid.every=0", "valid.micro_batch_size=8", "valid.generate_rows=0",
             "checkpoint.every=0", "checkpoint.keep_best=0", *TOKENIZE, *extra],
        )

    def eval_cfg(self, run: Path, *extra: str) -> EvalConfig:
        """The shipped eval config on `run` alone, with a small greedy preset ("tiny": 16 test rows, 8 new
        tokens, seed 10)."""
        return load_config(
            EvalConfig,
            CONFIGS / "tiny/eval.yaml",
            [f"runs=[{run}]", "teacher=null", f"suite_defs.tiny-test.path={self.data}/test.jsonl", "preset=tiny",
             "presets.tiny.limit=16", "presets.tiny.max_prompt_length=48", "presets.tiny.generate.max_new_tokens=8",
             "presets.tiny.generate.seeds=[10]", *extra],
        )


def assert_labels_are_the_sampled_ids(cache_dir, rollout_dir):
    """Every row of a cache built from a rollout directory holds exactly the ids that were sampled (prompt ids, then
    response ids, the EOS included when it was sampled): the teacher scored the student's own tokens. Returns the
    cache's reader."""
    from pipeline.cache.store import CacheReader
    from pipeline.config import DataConfig
    from pipeline.data.records import load_examples

    by_id = {e.id: e for e in load_examples(DataConfig(path=str(rollout_dir)))}
    reader = CacheReader(cache_dir, student_tokenizer=next(iter(by_id.values())).tokenizer)  # the sampling one's view
    assert len(reader) == len(by_id)
    for i in range(len(reader)):
        row = reader[i]
        e = by_id[row.id]
        ids = list(row.student_ids)
        assert ids[: row.student_response_start] == list(e.prompt_ids)
        assert ids[row.student_response_start :] == list(e.response_ids)
    return reader


def student_reader(cache, tokenizer):
    """The cache read for the student with `tokenizer` (a ModelRef, a path, or a loaded tokenizer): through its student
    view, built when missing, as stage 2 reads it."""
    from pipeline.config import ModelRef
    from pipeline.models.load import load_tokenizer
    from pipeline.train.sources import open_for_student

    if isinstance(tokenizer, (str, Path)):
        tokenizer = ModelRef(path=str(tokenizer))
    return open_for_student(cache, load_tokenizer(tokenizer) if isinstance(tokenizer, ModelRef) else tokenizer)


_SHARED_TOKENIZERS: dict = {}


def shared_tokenizer(name: str):
    """A real tokenizer from ../shared/tokenizers (`ggml-vocab-<name>.gguf`), loaded once per session.

    llama-spm gets the exact Llama-2 pre-processing that the GGUF conversion loses (shared/tokenizers/README)."""
    if name not in _SHARED_TOKENIZERS:
        from tokenizers import normalizers
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(SHARED / "tokenizers"), gguf_file=f"ggml-vocab-{name}.gguf")
        if name == "llama-spm":
            tok.backend_tokenizer.normalizer = normalizers.Sequence(
                [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
            )
            tok.backend_tokenizer.pre_tokenizer = None
        _SHARED_TOKENIZERS[name] = tok
    return _SHARED_TOKENIZERS[name]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyDefault:
    """Assets and an SFT'd (4 steps) teacher, built once per session."""
    from stages import assets, distill

    t = TinyDefault(tmp_path_factory.mktemp("tiny"))
    assets.run(t.assets_cfg())
    distill.run(t.teacher_sft_cfg())
    return t


@pytest.fixture(scope="session")
def caches(tiny) -> TinyDefault:
    """The tiny default with its training and validation caches built (stage 2's inputs)."""
    from stages import teacher_cache

    teacher_cache.run(tiny.cache_cfg())
    teacher_cache.run(tiny.valid_cache_cfg())
    return tiny


def tiny_lm(kind: str, layers: int = 2, vocab: int = 97):
    """A tiny causal LM built from a config (seeded, eval mode): llama, qwen2-tied, qwen2-windows (sliding windows
    in the first half of the layers), gemma3 (its sliding / global layer pattern), gemma3-softcap, gpt2."""
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2-tied":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    elif kind == "qwen2-windows":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=True,
                                             sliding_window=3, max_window_layers=layers // 2))
    elif kind == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, sliding_window=3))
    elif kind == "gemma3-softcap":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=8, final_logit_softcapping=5.0, sliding_window=4))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=64))
    else:
        raise ValueError(kind)
    return model.eval()
