"""Offline macro-F1 metric for `evaluate`, backed by scikit-learn.

`labels` names the label ids to average over, so a prediction outside the label set
(an invalid output, id -1) counts as a miss for the gold class instead of as a class.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score


class MacroF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Unweighted mean of per-label F1 over the label set.",
            citation="",
            inputs_description="predictions and references: lists of integer label ids; labels: ids to average",
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, labels=None):
        score = f1_score(references, predictions, labels=labels, average="macro", zero_division=0)
        return {"macro_f1": float(score)}
