"""Accuracy and macro-averaged F1 for single-label classification, as an `evaluate` metric script."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy and macro-averaged F1 of integer class predictions against integer references."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
Returns:
    accuracy (float): fraction of predictions equal to the reference.
    macro_f1 (float): unweighted mean over the classes present in references or predictions of the per-class F1.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        f1_scores = []
        for label in np.union1d(predictions, references):
            true_positive = np.sum((predictions == label) & (references == label))
            predicted = np.sum(predictions == label)
            actual = np.sum(references == label)
            f1_scores.append(2 * true_positive / (predicted + actual) if predicted + actual else 0.0)
        return {"accuracy": float(np.mean(predictions == references)), "macro_f1": float(np.mean(f1_scores))}
