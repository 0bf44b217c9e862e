"""Layer dropping: a student made from a decoder by keeping some of its layers (the prune-then-distil recipe).

`prune(model, keep)` builds a fresh model of the same class from the teacher's config with `len(keep)` layers and
copies every weight over: the kept decoder layers (renumbered 0..n-1, so attention layer indices and per-layer
config lists such as Gemma-3's `layer_types` follow), embeddings, final norm and head. Nothing is re-initialised,
so keeping every layer gives back the same model, logit for logit (a test checks this).
"""

from __future__ import annotations

import contextlib
import re

import torch

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# config entries that hold one value per layer, sliced like the layers
PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "sliding_window_pattern_list")


class PruneError(ValueError):
    """The model cannot be pruned as asked (layer indices, architecture)."""


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_count(config) -> int:
    cfg = _text_config(config)
    for key in LAYER_COUNT_KEYS:
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    raise PruneError(f"{type(config).__name__}: no layer count among {LAYER_COUNT_KEYS}")


def layer_stack(model) -> str:
    """Qualified name of the ModuleList that holds the decoder layers (`model.layers`, `transformer.h`, ...)."""
    n = layer_count(model.config)
    found = [name for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise PruneError(f"{type(model).__name__}: expected one list of {n} decoder layers, found {found or 'none'}")
    return found[0]


def choose_layers(n: int, num_layers: int | None, layers: list[int] | None, strategy: str) -> list[int]:
    """Indices of the layers kept, ascending. `spread`: evenly spaced, the first and the last always kept (the
    bottom layer reads the embeddings, the top one writes into the head); `first`: the bottom `num_layers`."""
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n]
        if bad or len(set(layers)) != len(layers) or not layers:
            raise PruneError(f"layers {layers}: need distinct indices in [0, {n - 1}]")
        return sorted(layers)
    if num_layers is None or not 1 <= num_layers <= n:
        raise PruneError(f"num_layers {num_layers}: need 1 <= num_layers <= {n} (the model has {n} layers)")
    if strategy == "first":
        return list(range(num_layers))
    if num_layers == 1:
        return [0]
    return sorted({round(i * (n - 1) / (num_layers - 1)) for i in range(num_layers)})


def pruned_config(config, keep: list[int]):
    config = config.__class__.from_dict(config.to_dict())
    cfg = _text_config(config)
    for key in LAYER_COUNT_KEYS:
        if isinstance(getattr(cfg, key, None), int):
            setattr(cfg, key, len(keep))
    for key in PER_LAYER_KEYS:
        values = getattr(cfg, key, None)
        if isinstance(values, (list, tuple)) and len(values) >= max(keep) + 1:
            setattr(cfg, key, [values[i] for i in keep])
    if isinstance(getattr(cfg, "max_window_layers", None), int):  # qwen2: the first N layers use sliding windows
        cfg.max_window_layers = sum(1 for i in keep if i < cfg.max_window_layers)
    return config


def prune(model, keep: list[int]):
    """A new model of `model`'s class with only the decoder layers `keep` (ascending), every weight copied."""
    stack = layer_stack(model)
    new_index = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(stack)}\.(\d+)\.(.*)$")
    state = {}
    for key, value in model.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in new_index:
            state[f"{stack}.{new_index[int(m.group(1))]}.{m.group(2)}"] = value
    config = pruned_config(model.config, keep)
    dtype = next(model.parameters()).dtype
    with _no_init():  # every parameter is overwritten below: skip the random initialisation (minutes at 7B)
        student = model.__class__(config)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = getattr(_text_config(config), "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]  # tied: not stored under its name
    if missing or unexpected:
        raise PruneError(f"weights do not match the pruned model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if tied:
        student.tie_weights()
    return student.to(dtype).eval()


def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers layout: initialise, then overwrite
        return contextlib.nullcontext()
    return no_init_weights()
