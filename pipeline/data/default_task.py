"""The built-in default: a generated task, two tokenizers trained on it, and tiny models.

Everything is deterministic from the config and needs no network. The task, category chains: twelve categories of
six words in a fixed cyclic order (fruit -> animal -> colour -> ...); a prompt shows three words that follow the
order ("Continue the chain with 3 more words: grape rabbit brown") and the answer adds three more, each a word of the
category after the previous word's ("ladder island drum": any tool, any place, any instrument). Every prompt has
6^3 = 216 right answers; a labelled response is one drawn at random, and test / valid rows list all of them under
"answers" (exact match against any is meaningful). The teacher's distribution at each answer position is spread over
the six words of the next category: what soft targets carry and one drawn label does not.
The tokenizers are of different kinds, so the default shows both same- and cross-tokenizer distillation:
- "bpe": byte-level BPE (GPT-2 / Llama-3 / Qwen style);
- "metaspace": a SentencePiece-style BPE model with the Metaspace ('▁') pre-tokenizer (Llama-2 style), whole words
  like the teacher's: every student token aligns exactly with a teacher token;
- "pieces": the same kind with a small vocabulary (280), stopped before it merges every word: about half the answer
  words are one token, the others several pieces ("▁i s l an d"), so exact token pairs cover about half of the
  response (chunks all of it), the regime where cross-tokenizer objectives differ by what they reach.
"""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.config import TaskDataConfig, TinyModelConfig
from pipeline.data.records import write_jsonl

TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"

# Twelve categories of six words; the chain rule walks them in this order, cyclically.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "lemon", "mango", "cherry", "grape", "peach"),
    "animal": ("tiger", "zebra", "parrot", "horse", "rabbit", "monkey"),
    "colour": ("violet", "yellow", "silver", "purple", "green", "brown"),
    "tool": ("hammer", "needle", "magnet", "kettle", "shovel", "ladder"),
    "place": ("island", "castle", "market", "harbor", "jungle", "meadow"),
    "instrument": ("drum", "flute", "guitar", "piano", "violin", "trumpet"),
    "vehicle": ("rocket", "train", "truck", "bicycle", "wagon", "canoe"),
    "drink": ("coffee", "tea", "milk", "juice", "water", "cocoa"),
    "metal": ("iron", "copper", "gold", "zinc", "nickel", "tin"),
    "sport": ("tennis", "soccer", "hockey", "golf", "rugby", "boxing"),
    "weather": ("rain", "snow", "storm", "fog", "wind", "hail"),
    "clothing": ("shirt", "jacket", "scarf", "boots", "gloves", "hat"),
}
CATEGORY_OF = {w: c for c, ws in CATEGORIES.items() for w in ws}
# the chain rule: each word is of the category after the previous word's, in this (cyclic) order
ORDER = tuple(CATEGORIES)
NEXT = {c: ORDER[(i + 1) % len(ORDER)] for i, c in enumerate(ORDER)}
SHOWN = 3  # words of the chain the prompt shows
ASKED = 3  # words the answer adds


def _draw(r: random.Random) -> tuple[str, str]:
    """A chain of SHOWN words that follows the rule, from a random start; returns the instruction and the last word."""
    words = [r.choice(CATEGORIES[r.choice(ORDER)])]
    while len(words) < SHOWN:
        words.append(r.choice(CATEGORIES[NEXT[CATEGORY_OF[words[-1]]]]))
    return f"Continue the chain with {ASKED} more words: {' '.join(words)}", words[-1]


def right_answers(last: str) -> list[str]:
    """The answer rule: ASKED words, each of the category after the previous word's, separated by spaces."""
    import itertools

    cats, c = [], CATEGORY_OF[last]
    for _ in range(ASKED):
        c = NEXT[c]
        cats.append(CATEGORIES[c])
    return [" ".join(ws) for ws in itertools.product(*cats)]


def generate_splits(cfg: TaskDataConfig) -> dict[str, list[dict]]:
    """Test, valid and train rows whose prompts never appear in two splits.

    A row's "response" is one right answer drawn uniformly (what one labeller writes down); test and valid rows also
    list every right answer under "answers", the drawn one first (the reference whose NLL eval reports). Test and
    valid prompts are distinct; a train prompt may recur with a fresh answer (several labellers), so the labels show
    the spread of right answers only across rows, while a teacher's distribution shows it at every row."""
    r = random.Random(cfg.seed)
    held: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, n in {"test": cfg.n_test, "valid": cfg.n_valid, "train": cfg.n_train}.items():
        rows: list[dict] = []
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct {split} prompts; lower task sizes")
            instruction, last = _draw(r)
            prompt = TEMPLATE.format(instruction=instruction)
            if prompt in held:
                continue
            if split != "train":
                held.add(prompt)
            answers = right_answers(last)
            response = r.choice(answers)
            row = {"id": f"{split}-{len(rows):05d}", "prompt": prompt, "response": response}
            if split != "train":
                row["answers"] = [response] + [a for a in answers if a != response]
            rows.append(row)
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
    """SentencePiece-style BPE (Llama-2 style: '▁' marks a space, pieces are characters, not bytes) with the Metaspace
    pre-tokenizer; EOS '</s>', pad '<pad>', unk '<unk>'. (The Unigram trainer of `tokenizers` degenerates to single
    characters on a corpus this small.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),  # a line break is a token of its own
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>", "<pad>"], show_progress=False)
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
