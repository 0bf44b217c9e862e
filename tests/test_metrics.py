"""Rouge-L and exact match against hand-computed values."""

from __future__ import annotations

import pytest

from pipeline.evaluate.metrics import exact_match, rouge_l, score


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


def test_rouge_l_is_the_max_over_references_whatever_their_order():
    """The search stops at F = 1 (an identical reference first); otherwise every reference is scored."""
    from rouge_score import rouge_scorer

    from pipeline.data.default_task import right_answers

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    refs = right_answers("grape")
    for pred in (refs[7], "rabbit brown ladder", "tiger silver kettle", "x y z", "", "!!", refs[7] + " more"):
        brute = max(scorer.score(r, pred)["rougeL"].fmeasure for r in refs)
        assert rouge_l(pred, refs) == brute and rouge_l(pred, refs[::-1]) == brute
    assert rouge_l("!!", ["!!"]) == 0.0  # nothing to match after tokenisation: 0, as rouge-score says
