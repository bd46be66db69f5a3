"""Offline evaluation metrics for the `evaluate` library.

`evaluate.load("accuracy")` fetches its script from the Hub, which is unreachable on offline machines; the same
metric shipped as a local script loads through the real `evaluate` machinery with no network.
"""

from __future__ import annotations

from pathlib import Path

_SCRIPTS = Path(__file__).parent


def load_classification_metric(**kwargs):
    """`evaluate` module computing accuracy and macro-F1 for single-label classification, loaded offline."""
    import evaluate

    return evaluate.load(str(_SCRIPTS / "classification.py"), **kwargs)
