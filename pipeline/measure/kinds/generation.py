"""Generation: the answer is a text compared with a reference; chrF (sacrebleu) is the primary, ROUGE-L
(rouge-score) and exact match beside it. Both libraries score locally; nothing is downloaded."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pipeline.measure.kinds.base import Scored, TaskKind


@lru_cache(maxsize=1)
def _scorers():
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import CHRF

    return CHRF(), RougeScorer(["rougeL"], use_stemmer=False)


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.casefold().split()) == " ".join(b.casefold().split())


class Generation(TaskKind):
    name = "generation"
    primary = "chrf"
    primary_label = "chrF"
    binary = False
    secondary = ("rouge_l", "ROUGE-L")
    row_mean = True  # the mean of sentence-level chrF, so each row weighs the same

    def score(self, output: str, target: str) -> Scored:
        answer = output.strip()
        if not answer:
            return Scored(None, 0.0, False)
        chrf, _ = _scorers()
        return Scored(answer, chrf.sentence_score(answer, [target]).score / 100, _same_text(answer, target))

    def metrics(self, scored: list[Scored], targets: list[str], outputs: list[str]) -> dict[str, float]:
        """chrf (the mean of sentence chrF, on 0-1), rouge_l (mean ROUGE-L F-measure), exact_match (equal but
        for case and spacing) and invalid_rate (empty answers)."""
        _, rouge = _scorers()
        n = len(scored)
        rouge_l = [rouge.score(t, s.parsed)["rougeL"].fmeasure if s.parsed else 0.0 for s, t in zip(scored, targets)]
        return {"chrf": sum(s.score for s in scored) / n, "rouge_l": sum(rouge_l) / n,
                "exact_match": sum(s.exact for s in scored) / n,
                "invalid_rate": sum(s.parsed is None for s in scored) / n}

    def prediction_fields(self, scored: Scored) -> dict[str, Any]:
        return {"parsed": scored.parsed, "correct": scored.exact, "score": round(scored.score, 6)}
