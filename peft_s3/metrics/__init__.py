"""Offline evaluation metrics for the `evaluate` library.

`evaluate.load("accuracy")` fetches its script from the Hub, which is unreachable on offline machines; the same
metric shipped as a local script loads through the real `evaluate` machinery with no network.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_SCRIPTS = Path(__file__).parent


def load_classification_metric(**kwargs):
    """`evaluate` module computing accuracy and macro-F1 for single-label classification, loaded offline."""
    import evaluate

    return evaluate.load(str(_SCRIPTS / "classification.py"), **kwargs)


def classification_compute_metrics(metric: Any = None) -> Callable[[Any], dict[str, float]]:
    """A `Trainer(compute_metrics=...)` function: argmax of the logits scored by the offline classification metric."""
    metric = load_classification_metric() if metric is None else metric

    def compute(prediction: Any) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    return compute
