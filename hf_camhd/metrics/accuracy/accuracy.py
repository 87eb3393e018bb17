"""Accuracy as an 🤗 ``evaluate`` module that ships with hf_camhd (works offline; the Hub's ``accuracy`` needs network).

Same name, inputs and result as the Hub module ``evaluate.load("accuracy")``: the fraction (or, with
``normalize=False``, the number / total weight) of predictions equal to their references; ``sample_weight``
weights each example. Load it with ``evaluate.load(path)`` — :func:`hf_camhd.metrics.load` does that:

    >>> from hf_camhd import metrics
    >>> accuracy = metrics.load("accuracy")
    >>> accuracy.name, accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    ('accuracy', {'accuracy': 0.75})
    >>> accuracy.compute(predictions=[0, 1], references=[0, 0], normalize=False)
    {'accuracy': 1.0}
"""

import evaluate
import numpy as np

from hf_camhd.metrics import SKLEARN_CITATION, label_metric_info, sample_weights

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the total number of cases processed:
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    normalize (`boolean`): If False, returns the number of correctly classified samples (the sum of their
        weights with `sample_weight`). Otherwise, returns the fraction. Defaults to True.
    sample_weight (`list` of `float`): Sample weights. Defaults to None.
Returns:
    accuracy (`float`): Accuracy score, in [0, 1] with `normalize=True`.
"""

_CITATION = SKLEARN_CITATION


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return label_metric_info("accuracy", _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        weight = sample_weights(sample_weight, len(correct))
        total = float((correct * weight).sum())
        return {"accuracy": total / float(weight.sum()) if normalize else total}
