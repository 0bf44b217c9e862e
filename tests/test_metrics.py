"""Rouge-L and exact match against hand-computed values."""

from __future__ import annotations

import pytest

from pipeline.metrics import exact_match, rouge_l, score


def test_exact_match_uses_squad_normalisation():
    assert exact_match("The Answer!", ["answer"]) == 1.0
    assert exact_match("an  apple.", ["Apple"]) == 1.0
    assert exact_match("1000 m", ["100 m"]) == 0.0
    assert exact_match("x", ["y", "X"]) == 1.0  # any reference


def test_rouge_l_by_hand():
    assert rouge_l("a b c d", ["a b c d"]) == 1.0
    assert rouge_l("x y", ["a b"]) == 0.0
    # LCS("a b c d", "a c e") = 2: precision 2/4, recall 2/3, F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c d", ["a c e"]) == pytest.approx(4 / 7)
    assert rouge_l("a b", ["x", "a b"]) == 1.0  # max over references


def test_score_is_percent():
    s = score(["a b", "x"], [["a b"], ["y"]])
    assert s == {"rougeL": 50.0, "exact_match": 50.0}
