"""Evaluation metrics: Rouge-L (rouge-score, stemmed, F-measure, max over references), exact match (SQuAD
normalisation) and GSM8K final-answer accuracy."""

from __future__ import annotations

import math
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
    best = 0.0
    # a reference equal to the prediction first: F = 1 is the maximum and ends the search (a prompt of the built-in
    # task has 216 references)
    for r in sorted(references, key=lambda r: r != prediction):
        best = max(best, _SCORER.score(r, prediction)["rougeL"].fmeasure)
        if best >= 1.0:
            break
    return best


def score(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean Rouge-L and exact match, x 100."""
    n = len(predictions)
    return {
        "rougeL": 100 * sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "exact_match": 100 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
    }


# a number as people write it: an optional minus (not the hyphen of "5-10"), an optional "$", thousands commas,
# decimals; "18 dollars", "$18.00", "18kg" and "18." all read as 18
_NUMBER = re.compile(r"(?<![\w.])(-\s?)?\$?\s?(-)?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")


def parse_numbers(text: str) -> list[float]:
    out = []
    for m in _NUMBER.finditer(text):
        value = float(m.group(3).replace(",", "") + (m.group(4) or ""))
        out.append(-value if (m.group(1) or m.group(2)) else value)
    return out


def gsm8k_reference(answer: str) -> float:
    """The final answer of a GSM8K reference: the number after its last '####'."""
    if "####" not in answer:
        raise ValueError(f"not a GSM8K answer (no '####'): {answer[-60:]!r}")
    numbers = parse_numbers(answer.rsplit("####", 1)[1])
    if not numbers:
        raise ValueError(f"no number after '####': {answer[-60:]!r}")
    return numbers[0]


def gsm8k_prediction(text: str) -> float | None:
    """A prediction's final answer: the number after its last '####' when it wrote one (a model trained on GSM8K's
    format), else its last number; None when it has none."""
    if "####" in text and (after := parse_numbers(text.rsplit("####", 1)[1])):
        return after[0]
    numbers = parse_numbers(text)
    return numbers[-1] if numbers else None


def gsm8k_correct(prediction: str, references: list[str]) -> float:
    got = gsm8k_prediction(prediction)
    return float(got is not None and any(math.isclose(got, gsm8k_reference(r), rel_tol=0, abs_tol=1e-6)
                                         for r in references))


def score_suite(metric: str, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """A suite's scores, x 100: Rouge-L and exact match ("rougeL") or final-answer accuracy ("gsm8k")."""
    if metric == "gsm8k":
        return {"accuracy": 100 * sum(gsm8k_correct(p, r) for p, r in zip(predictions, references)) / len(predictions)}
    return score(predictions, references)


# the headline score of each metric kind (the report's cells)
HEADLINE = {"rougeL": "rougeL", "gsm8k": "accuracy"}
