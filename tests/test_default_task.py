"""The built-in task: deterministic, disjoint splits, every task in every split, answers that follow their rule."""

from __future__ import annotations

import collections

from pipeline.config import TaskDataConfig
from pipeline.default_task import TASKS, TEMPLATE, generate_splits


def test_deterministic_and_disjoint():
    cfg = TaskDataConfig(n_train=800, n_valid=80, n_test=80, seed=3)
    a, b = generate_splits(cfg), generate_splits(cfg)
    assert a == b
    assert generate_splits(TaskDataConfig(n_train=800, n_valid=80, n_test=80, seed=4)) != a
    prompts = {split: {r["prompt"] for r in rows} for split, rows in a.items()}
    assert {k: len(v) for k, v in prompts.items()} == {"train": 800, "valid": 80, "test": 80}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["valid"]
    assert not prompts["valid"] & prompts["test"]
    for rows in a.values():
        # round-robin over kinds; a duplicate draw moves on to the next kind, so counts are near-even, except
        # "repeat", whose prompt space is only 60 words x 3 counts = 180 prompts over all splits
        counts = collections.Counter(r["task"] for r in rows)
        assert set(counts) == set(TASKS)
        others = [n for kind, n in counts.items() if kind != "repeat"]
        assert max(others) <= 1.5 * min(others)
    assert sum(1 for rows in a.values() for r in rows if r["task"] == "repeat") <= 180


def test_answers_follow_the_rule():
    rows = generate_splits(TaskDataConfig(n_train=400, n_valid=8, n_test=8))["train"]
    for r in rows:
        instruction = r["prompt"].removeprefix("### Instruction:\n").removesuffix("\n\n### Response:\n")
        assert r["prompt"] == TEMPLATE.format(instruction=instruction) and r["response"].strip()
        if r["task"] == "add":
            a, b = instruction.removeprefix("What is ").removesuffix("?").split(" + ")
            assert int(r["response"]) == int(a) + int(b)
        elif r["task"] == "reverse_words":
            words = instruction.split(": ")[1].split()
            assert r["response"].split() == words[::-1]
        elif r["task"] == "sort":
            order, numbers = instruction.removeprefix("Sort in ").split(" order: ")
            xs = [int(x) for x in numbers.split(", ")]
            assert [int(y) for y in r["response"].split(", ")] == sorted(xs, reverse=order == "descending")
