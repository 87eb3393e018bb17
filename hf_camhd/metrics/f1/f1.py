"""F1 score as an 🤗 ``evaluate`` module that ships with hf_camhd (works offline; the Hub's ``f1`` needs network).

Same name, inputs and result as the Hub module ``evaluate.load("f1")`` (scikit-learn's definition):
F1 = 2 · precision · recall / (precision + recall), per class; ``average`` is ``"binary"`` (the class
``pos_label``), ``"micro"``, ``"macro"``, ``"weighted"`` or ``None`` (one score per label). A class that is
never predicted nor present scores 0.

    >>> from hf_camhd import metrics
    >>> f1 = metrics.load("f1")
    >>> f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'f1': 0.6666666666666666}
    >>> round(f1.compute(predictions=[0, 2, 1, 2], references=[0, 1, 1, 2], average="macro")["f1"], 4)
    0.7778
"""

import evaluate
import numpy as np

from hf_camhd.metrics import SKLEARN_CITATION, label_metric_info, sample_weights

_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall: F1 = 2 * (precision * recall) / (precision + recall).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    labels (`list` of `int`): The labels to include (with `average` other than "binary"). Defaults to every
        label present in predictions or references, sorted.
    pos_label (`int`): The class to report with `average="binary"`. Defaults to 1.
    average (`string`): "binary" (default; two classes), "micro" (global counts), "macro" (unweighted mean of
        the per-label scores), "weighted" (mean weighted by each label's support) or None (per-label scores).
    sample_weight (`list` of `float`): Sample weights. Defaults to None.
Returns:
    f1 (`float` or `array` of `float`): in [0, 1]; one per label with `average=None`.
"""

_CITATION = SKLEARN_CITATION

_AVERAGES = ("binary", "micro", "macro", "weighted", None)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return label_metric_info("f1", _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in _AVERAGES:
            raise ValueError(f"Invalid average: {average!r}; expected one of {', '.join(map(str, _AVERAGES))}")
        preds, refs = np.asarray(predictions), np.asarray(references)
        weight = sample_weights(sample_weight, len(refs))
        present = np.union1d(preds, refs)
        if average == "binary":
            if len(present) > 2:
                raise ValueError(f"Invalid average: 'binary' needs at most two classes, got {len(present)} "
                                 f"({present.tolist()}); choose average='micro', 'macro' or 'weighted'")
            if len(present) == 2 and pos_label not in present:
                raise ValueError(f"Invalid pos_label: {pos_label!r} is not among the labels {present.tolist()}")
            labels = [pos_label]
        elif labels is None:
            labels = present
        labels = np.asarray(labels)
        tp = np.array([weight[(preds == c) & (refs == c)].sum() for c in labels])
        predicted = np.array([weight[preds == c].sum() for c in labels])
        true = np.array([weight[refs == c].sum() for c in labels])
        if average == "micro":
            denominator = predicted.sum() + true.sum()
            return {"f1": float(2 * tp.sum() / denominator) if denominator else 0.0}
        denominators = predicted + true
        per_label = np.divide(2 * tp, denominators, out=np.zeros(len(labels)), where=denominators > 0)
        if average in ("binary", "macro"):
            return {"f1": float(per_label.mean())}
        if average == "weighted":
            return {"f1": float((per_label * true).sum() / true.sum()) if true.sum() else 0.0}
        return {"f1": per_label}
