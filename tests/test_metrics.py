import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from peft_s3.metrics import load_classification_metric


@pytest.mark.parametrize("num_classes", [2, 5])
def test_classification_metric_matches_sklearn(num_classes, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = np.random.default_rng(num_classes)
    references = rng.integers(0, num_classes, size=200)
    predictions = np.where(rng.random(200) < 0.6, references, rng.integers(0, num_classes, size=200))
    result = load_classification_metric().compute(predictions=predictions, references=references)
    assert result["accuracy"] == pytest.approx(accuracy_score(references, predictions))
    assert result["macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro"))


def test_compute_metrics_scores_the_argmax_of_logits(monkeypatch):
    from transformers import EvalPrediction

    from peft_s3.metrics import classification_compute_metrics

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [0.5, 0.4], [-3.0, 3.0]])
    references = np.array([0, 1, 1, 0])
    # Trainer passes a tuple when the model returns more than the logits.
    for predictions in (logits, (logits, np.zeros(4))):
        result = classification_compute_metrics()(EvalPrediction(predictions=predictions, label_ids=references))
        assert result["accuracy"] == pytest.approx(0.5)
        assert result["macro_f1"] == pytest.approx(f1_score(references, [0, 1, 0, 1], average="macro"))
