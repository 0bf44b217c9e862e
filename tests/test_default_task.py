"""The built-in task (category chains): deterministic, held-out test/valid prompts, every answer follows the stated
rule, test/valid rows list every right answer, labels are drawn uniformly; the two tokenizers trained on it."""

from __future__ import annotations

import collections
import itertools

import pytest

from pipeline.config import TaskDataConfig
from pipeline.data.default_task import (
    ASKED,
    CATEGORIES,
    CATEGORY_OF,
    NEXT,
    ORDER,
    SHOWN,
    TEMPLATE,
    corpus,
    generate_splits,
    right_answers,
    train_bpe_tokenizer,
    train_metaspace_tokenizer,
    write_splits,
)

CFG = TaskDataConfig(n_train=1200, n_valid=100, n_test=100, seed=3)


def _chain(prompt: str) -> list[str]:
    instruction = prompt.removeprefix("### Instruction:\n").removesuffix("\n\n### Response:\n")
    assert prompt == TEMPLATE.format(instruction=instruction)
    head, words = instruction.split(": ")
    assert head == f"Continue the chain with {ASKED} more words"
    return words.split()


def _follows_rule(words: list[str]) -> bool:
    return all(CATEGORY_OF[b] == NEXT[CATEGORY_OF[a]] for a, b in zip(words, words[1:]))


def test_categories_are_a_cycle_of_distinct_words():
    words = [w for ws in CATEGORIES.values() for w in ws]
    assert len(words) == len(set(words)) == 72 and all(len(ws) == 6 for ws in CATEGORIES.values())
    # NEXT is one cycle through all twelve categories
    c, seen = ORDER[0], []
    for _ in ORDER:
        seen.append(c)
        c = NEXT[c]
    assert c == ORDER[0] and sorted(seen) == sorted(ORDER)


def test_deterministic_and_held_out():
    a, b = generate_splits(CFG), generate_splits(CFG)
    assert a == b
    assert generate_splits(TaskDataConfig(n_train=1200, n_valid=100, n_test=100, seed=4)) != a
    assert {k: len(v) for k, v in a.items()} == {"test": 100, "valid": 100, "train": 1200}
    prompts = {split: [r["prompt"] for r in rows] for split, rows in a.items()}
    # test and valid prompts are distinct, and none is a train prompt (train prompts may recur: several labels)
    assert len(set(prompts["test"])) == 100 and len(set(prompts["valid"])) == 100
    assert not set(prompts["test"]) & set(prompts["valid"])
    assert not set(prompts["train"]) & (set(prompts["test"]) | set(prompts["valid"]))
    assert len({r["id"] for rows in a.values() for r in rows}) == 1400


def test_every_answer_follows_the_rule_and_held_out_rows_list_all_of_them():
    splits = generate_splits(CFG)
    for split, rows in splits.items():
        for r in rows:
            shown = _chain(r["prompt"])
            assert len(shown) == SHOWN and _follows_rule(shown)
            answer = r["response"].split(" ")
            assert len(answer) == ASKED and _follows_rule(shown + answer)
            if split == "train":
                assert "answers" not in r
                continue
            # all 6^3 right answers, the drawn label first, no duplicates; and no wrong answer among them
            assert r["answers"][0] == r["response"] and len(r["answers"]) == len(set(r["answers"])) == 6 ** ASKED
            assert set(r["answers"]) == set(right_answers(shown[-1]))
    # brute force: every chain of ASKED words after `last` that follows the rule, and only those
    for last in ("grape", "hat", "tin"):
        words = [w for ws in CATEGORIES.values() for w in ws]
        brute = {" ".join(c) for c in itertools.product(words, repeat=ASKED) if _follows_rule([last, *c])}
        assert set(right_answers(last)) == brute


def test_labels_are_drawn_uniformly_over_the_right_answers():
    """Each answer word is drawn uniformly from its category: all six words of every category appear in the labels
    at about the same rate (what one label cannot show and the teacher's distribution does)."""
    rows = generate_splits(TaskDataConfig(n_train=6000, n_valid=10, n_test=10, seed=0))["train"]
    counts = collections.Counter(w for r in rows for w in r["response"].split(" "))
    assert set(counts) == set(CATEGORY_OF)
    for ws in CATEGORIES.values():
        n = [counts[w] for w in ws]
        assert max(n) < 1.35 * min(n), n
    # a recurring train prompt gets fresh answers
    by_prompt = collections.defaultdict(set)
    for r in rows:
        by_prompt[r["prompt"]].add(r["response"])
    assert max(len(v) for v in by_prompt.values()) > 1


def test_too_many_prompts_is_a_clear_error():
    # 72 words x 6 x 6 = 2592 distinct chains of three
    with pytest.raises(ValueError, match="cannot draw 2000 distinct valid prompts"):
        generate_splits(TaskDataConfig(n_train=10, n_valid=2000, n_test=1000))


def test_tokenizers_learn_words_not_characters(tmp_path):
    """Both trained tokenizers encode every category word in at most two tokens and round-trip every row; the
    metaspace one keeps a line break as a token of its own."""
    paths = write_splits(TaskDataConfig(n_train=600, n_valid=20, n_test=20), tmp_path)
    texts = corpus([paths["train"], paths["valid"]])
    for tok in (train_bpe_tokenizer(texts, 1024), train_metaspace_tokenizer(texts, 1024)):
        assert 100 < len(tok) <= 1024
        for w in CATEGORY_OF:
            assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) <= 2, (tok.eos_token, w)
        for t in texts[:200]:
            assert tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t
    meta = train_metaspace_tokenizer(texts, 1024)
    pieces = meta.convert_ids_to_tokens(meta("a\n\nb", add_special_tokens=False)["input_ids"])
    assert pieces.count("\n") == 2
