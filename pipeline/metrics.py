"""Evaluation metrics: Rouge-L (rouge-score, stemmed, F-measure, max over references) and exact match."""

from __future__ import annotations

import re
import string


def _normalise(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str]) -> float:
    return float(any(_normalise(prediction) == _normalise(r) for r in references))


_SCORER = None


def rouge_l(prediction: str, references: list[str]) -> float:
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return max(_SCORER.score(r, prediction)["rougeL"].fmeasure for r in references)


def score(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean Rouge-L and exact match, x 100."""
    n = len(predictions)
    return {
        "rougeL": 100 * sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "exact_match": 100 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
    }
