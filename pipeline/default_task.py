"""The built-in default: a generated instruction task, two tokenizers trained on it, and tiny models.

Everything is deterministic from the config and needs no network. The task mixes templated instructions with exact
answers (addition, subtraction, unit conversion, sorting, word edits) in the `{"prompt", "response"}` jsonl format.
Every task is compositional (a rule over digits or over words seen in training), so test prompts, which never appear
in training, are solvable.
The tokenizers are of different kinds, so the default shows both same- and cross-tokenizer distillation:
- "bpe": byte-level BPE (GPT-2 / Llama-3 / Qwen style);
- "metaspace": a SentencePiece-style Unigram model with the Metaspace ('▁') pre-tokenizer (Llama-2 / T5 style).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from pipeline.config import TaskDataConfig, TinyModelConfig
from pipeline.data import write_jsonl

TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"

WORDS = (
    "apple river garden stone music window planet forest silver candle bridge orange winter summer yellow "
    "market pencil rocket island coffee dragon mirror basket castle violet thunder meadow lantern pepper "
    "tiger ocean branch cloud marble feather copper harbor jungle velvet engine puzzle shadow blanket wizard "
    "carpet falcon ginger hammer kettle lemon magnet needle parrot quartz saddle tunnel walnut zebra"
).split()

UNITS = [  # (from, to, factor): powers of ten, so an unseen number converts by the same rule
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("cm", "mm", 10),
    ("kg", "g", 1000),
    ("L", "mL", 1000),
]


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 30), r.randint(0, 30)
    return f"What is {a} + {b}?", str(a + b)


def _sub(r: random.Random) -> tuple[str, str]:
    a = r.randint(0, 40)
    b = r.randint(0, a)
    return f"What is {a} - {b}?", str(a - b)


def _convert(r: random.Random) -> tuple[str, str]:
    src, dst, factor = r.choice(UNITS)
    n = r.randint(1, 99)
    return f"Convert {n} {src} to {dst}.", f"{n * factor} {dst}"


def _sort(r: random.Random) -> tuple[str, str]:
    xs = [r.randint(0, 30) for _ in range(r.randint(3, 5))]
    order = r.choice(["ascending", "descending"])
    ys = sorted(xs, reverse=order == "descending")
    return f"Sort in {order} order: {', '.join(map(str, xs))}", ", ".join(map(str, ys))


def _reverse(r: random.Random) -> tuple[str, str]:
    ws = r.sample(WORDS, r.randint(2, 4))
    return f"Reverse the order of the words: {' '.join(ws)}", " ".join(reversed(ws))


def _upper(r: random.Random) -> tuple[str, str]:
    ws = r.sample(WORDS, r.randint(1, 3))
    return f"Write in capital letters: {' '.join(ws)}", " ".join(ws).upper()


def _repeat(r: random.Random) -> tuple[str, str]:
    w, n = r.choice(WORDS), r.randint(2, 4)
    return f"Repeat the word {w} {n} times.", " ".join([w] * n)


def _first_letters(r: random.Random) -> tuple[str, str]:
    ws = r.sample(WORDS, r.randint(2, 4))
    return f"Give the first letter of each word: {' '.join(ws)}", "".join(w[0] for w in ws)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "subtract": _sub,
    "convert": _convert,
    "sort": _sort,
    "reverse_words": _reverse,
    "uppercase": _upper,
    "repeat": _repeat,
    "first_letters": _first_letters,
}


def generate_splits(cfg: TaskDataConfig) -> dict[str, list[dict]]:
    """Disjoint train/valid/test splits (no prompt appears in two splits), round-robin over the task kinds."""
    r = random.Random(cfg.seed)
    sizes = {"test": cfg.n_test, "valid": cfg.n_valid, "train": cfg.n_train}
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    names = sorted(TASKS)
    i = 0
    for split, n in sizes.items():
        rows: list[dict] = []
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct {split} prompts; lower task sizes")
            kind = names[i % len(names)]
            instruction, answer = TASKS[kind](r)
            i += 1
            prompt = TEMPLATE.format(instruction=instruction)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append({"id": f"{split}-{len(rows):05d}", "task": kind, "prompt": prompt, "response": answer})
        splits[split] = rows
    return splits


def write_splits(cfg: TaskDataConfig, out_dir: Path) -> dict[str, Path]:
    return {split: write_jsonl(out_dir / f"{split}.jsonl", rows) for split, rows in generate_splits(cfg).items()}


# --------------------------------------------------------------------------------------------------------------
# Tokenizers


def corpus(paths: list[Path]) -> list[str]:
    import json

    texts = []
    for p in paths:
        for line in p.read_text().splitlines():
            rec = json.loads(line)
            texts += [rec["prompt"], rec["response"]]
    return texts


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with single-digit pre-tokens; EOS '<|endoftext|>', pad '<|pad|>'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def train_metaspace_tokenizer(texts: list[str], vocab_size: int):
    """SentencePiece-style Unigram with the Metaspace pre-tokenizer; EOS '</s>', pad '<pad>', unk '<unk>'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "</s>", "<pad>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


# --------------------------------------------------------------------------------------------------------------
# Models


def build_tiny_model(cfg: TinyModelConfig, tokenizer):
    """A randomly initialised Llama/Qwen2 causal LM sized by `cfg`, with the tokenizer's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        cfg.architecture
    ]
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    return model_cls(config)
