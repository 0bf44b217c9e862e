"""GGUF -> a plain transformers checkpoint (safetensors), once per file, cached by the file's content hash.

transformers reads a GGUF model by parsing its metadata in Python and dequantising every tensor, on every load
(SmolLM2-135M: 27 s; Gemma-3-270M with its 262k vocabulary: 79 s and 3x its float32 size in peak memory), and the
model it returns carries a GGUF "quantizer" that makes `save_pretrained` refuse it although its weights are
ordinary float tensors. Converting once gives an ordinary checkpoint: later loads take about a second, memory-map
the weights, and a student trained from it saves like any other model.

Layout of the conversion cache (`DSKD_CONVERTED`, default `~/.cache/dskd/converted`), one directory per GGUF file
content: `<stem>-<sha256[:16]>/tokenizer/` (the tokenizer, converted in-process: cheap) and `.../model/` (config,
float32 safetensors, generation config and the tokenizer: a complete checkpoint). Each is written under a temporary
name and renamed, so a killed conversion leaves nothing half-written; concurrent converters (ranks) both succeed.
The model conversion runs in a child process, so the dequantisation peak never counts against the caller.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.io_utils import save_pretrained, sha256_file

SOURCE_FILE = "source.json"


class ConversionError(RuntimeError):
    pass


def cache_root() -> Path:
    return Path(os.environ.get("DSKD_CONVERTED") or Path.home() / ".cache" / "dskd" / "converted")


_SHA: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within the process (a GGUF file is hashed once)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = sha256_file(path)
    return _SHA[key]


def entry_dir(gguf: Path) -> Path:
    """One directory per GGUF content and transformers version (which decides how GGUF is read)."""
    from importlib.metadata import version

    return cache_root() / f"{gguf.name.split('.')[0]}-{file_sha256(gguf)[:16]}-transformers{version('transformers')}"


def _commit(tmp: Path, final: Path, gguf: Path) -> Path:
    (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf)}, indent=2) + "\n")
    try:
        os.rename(tmp, final)
    except OSError:  # another process converted the same file first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    return final


def _tmp_for(final: Path) -> Path:
    tmp = final.with_name(f".{final.parent.name}-{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def tokenizer_dir(gguf: Path) -> Path:
    """The GGUF file's tokenizer as a tokenizer.json directory (converted on first use)."""
    final = entry_dir(gguf) / "tokenizer"
    if (final / SOURCE_FILE).is_file():
        return final
    from transformers import PreTrainedTokenizerFast

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_for(final)
    try:
        PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        return _commit(tmp, final, gguf)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_dir(gguf: Path) -> Path:
    """The GGUF model as a float32 safetensors checkpoint with its tokenizer (converted on first use, in a child
    process)."""
    final = entry_dir(gguf) / "model"
    if (final / SOURCE_FILE).is_file():
        return final
    tok = tokenizer_dir(gguf)
    print(f"converting {gguf.name} to safetensors once (cached in {final.parent})", file=sys.stderr, flush=True)
    code = "import sys; from pipeline.models.convert import _convert_model; _convert_model(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, str(gguf), str(tok), str(final)], capture_output=True,
                          text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        raise ConversionError(f"converting {gguf} failed: {lines[-1] if lines else f'exit code {proc.returncode}'}")
    return final


def _convert_model(gguf: str, tokenizer: str, final: str) -> None:
    """(child process) Load the GGUF dequantised, drop the quantizer marker, save as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig, PreTrainedTokenizerFast

    src, final_dir = Path(gguf), Path(final)
    tmp = _tmp_for(final_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        plain(model)
        save_pretrained(model, tmp)
        PreTrainedTokenizerFast.from_pretrained(tokenizer).save_pretrained(tmp)
        _commit(tmp, final_dir, src)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def plain(model):
    """A model whose GGUF weights were dequantised on load is an ordinary model: drop the marker that makes
    `save_pretrained` refuse it (no-op for other models)."""
    q = getattr(model, "hf_quantizer", None)
    if q is not None and getattr(getattr(q, "quantization_config", None), "quant_method", None) is not None \
            and str(q.quantization_config.quant_method).lower().endswith("gguf"):
        if any(type(m).__name__.lower().startswith("gguf") for m in model.modules()):
            raise ConversionError("this GGUF model kept quantized blocks (the `kernels` package is installed); load "
                                  "it with GgufConfig(dequantize=True) to train or save it")
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model
