"""`dskd prune`: a layer-dropped student equals its teacher with the other layers removed (brute force: the teacher's
own modules, the dropped layers taken out of its layer list), whatever the architecture's per-layer settings."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from pipeline.models.prune import PruneError, choose_layers, layer_stack, prune
from stages.cli import main
from tests.conftest import tiny_lm


def tiny(kind: str):
    return tiny_lm(kind, layers=6)


def brute_force(model, keep):
    """The teacher itself with the other layers taken out of its list (per-layer config lists sliced alike)."""
    ref = copy.deepcopy(model)
    stack = ref.get_submodule(layer_stack(ref))
    kept = [stack[i] for i in keep]
    stack._modules.clear()
    for layer in kept:
        stack.append(layer)
    cfg = ref.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, len(keep))
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [model.config.layer_types[i] for i in keep]
    return ref


IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]])


@pytest.mark.parametrize("kind", ["llama", "qwen2-windows", "gemma3", "gpt2"])
def test_pruned_model_is_the_teacher_without_the_dropped_layers(kind):
    model = tiny(kind)
    with torch.no_grad():
        full = prune(model, list(range(6)))  # nothing dropped: the same model, logit for logit
        torch.testing.assert_close(full(IDS).logits, model(IDS).logits, atol=0, rtol=0)
        for keep in ([0, 5], [0, 2, 3, 5], [1, 4]):
            student = prune(model, keep)
            assert student.config.get_text_config().to_dict().get("num_hidden_layers", len(keep)) == len(keep)
            n_student = sum(p.numel() for p in student.parameters())
            assert n_student < sum(p.numel() for p in model.parameters())
            ref = brute_force(model, keep)
            torch.testing.assert_close(student(IDS, use_cache=False).logits, ref(IDS, use_cache=False).logits,
                                       atol=1e-6, rtol=1e-6)
            # the KV cache is indexed by the renumbered layers: cached decoding gives what uncached decoding does
            kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
            torch.testing.assert_close(student.generate(IDS[:1], use_cache=True, **kw),
                                       student.generate(IDS[:1], use_cache=False, **kw))
    if kind == "qwen2-windows":  # layers 0 and 2 had windows, 3 and 5 did not
        assert prune(model, [0, 2, 3, 5]).config.max_window_layers == 2
    if kind == "gemma3":
        assert prune(model, [1, 5]).config.layer_types == ["sliding_attention", "full_attention"]


def test_tied_head_stays_tied():
    student = prune(tiny("qwen2-windows"), [0, 5])
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight


def test_choose_layers():
    for n in (2, 7, 30):
        for k in range(1, n + 1):
            keep = choose_layers(n, k, None, "spread")
            assert len(keep) == k and keep == sorted(set(keep)) and all(0 <= i < n for i in keep)
            if k > 1:
                assert keep[0] == 0 and keep[-1] == n - 1
    assert choose_layers(30, 10, None, "spread") == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert choose_layers(30, 3, None, "first") == [0, 1, 2]
    assert choose_layers(30, None, [5, 1], "spread") == [1, 5]
    for bad in ((31, None), (0, None), (None, [0, 0]), (None, [30]), (None, [])):
        with pytest.raises(PruneError):
            choose_layers(30, *bad, "spread")


def test_prune_stage(tmp_path):
    src = tmp_path / "teacher"
    tiny("llama").save_pretrained(src)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, "[UNK]")),
                            eos_token="b", pad_token="a").save_pretrained(src)
    cfg = tmp_path / "prune.yaml"
    cfg.write_text(f"model: {{path: {src}}}\nout_dir: {tmp_path / 'student'}\nnum_layers: 2\n")
    runner = CliRunner()
    res = runner.invoke(main, ["prune", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "kept layers [0, 5] of 6" in res.output
    out = tmp_path / "student"
    assert json.loads((out / "prune.json").read_text())["layers"] == [0, 5]
    assert (out / "tokenizer.json").is_file() and not (tmp_path / "student.tmp").exists()
    student = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        ref = prune(tiny("llama"), [0, 5])
        torch.testing.assert_close(student(IDS).logits, ref(IDS).logits)
    res = runner.invoke(main, ["prune", "--config", str(cfg)])
    assert res.exit_code == 0 and "up to date" in res.output
    res = runner.invoke(main, ["prune", "--config", str(cfg), "--set", "num_layers=7"])
    assert res.exit_code != 0 and "PruneError: num_layers 7: need 1 <= num_layers <= 6" in res.output
    res = runner.invoke(main, ["prune", "--config", str(cfg), "--set", "layers=[1]"])
    assert res.exit_code != 0 and "set exactly one of num_layers and layers" in res.output
