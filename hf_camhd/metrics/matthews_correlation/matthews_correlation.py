"""Matthews correlation as an 🤗 ``evaluate`` module that ships with hf_camhd (works offline).

Same name, inputs and result as the Hub module ``evaluate.load("matthews_correlation")`` (scikit-learn's
multiclass definition, Gorodkin 2004): from the confusion matrix C with true counts t = C·1, predicted counts
p = 1ᵀC, correct c = trace(C) and s examples, MCC = (c·s − t·p) / sqrt((s² − p·p)(s² − t·t)), in [−1, 1];
0 when either factor is 0.

    >>> from hf_camhd import metrics
    >>> mcc = metrics.load("matthews_correlation")
    >>> mcc.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'matthews_correlation': 0.5773502691896258}
"""

import evaluate
import numpy as np

from hf_camhd.metrics import SKLEARN_CITATION, label_metric_info, sample_weights

_DESCRIPTION = """
The Matthews correlation coefficient measures the quality of classifications: +1 a perfect prediction, 0 no better
than random, -1 complete disagreement. Unlike accuracy it stays informative when the classes are unbalanced.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    sample_weight (`list` of `float`): Sample weights. Defaults to None.
Returns:
    matthews_correlation (`float`): in [-1, 1].
"""

_CITATION = """
@article{gorodkin2004comparing,
  title={Comparing two K-category assignments by a K-category correlation coefficient},
  author={Gorodkin, Jan},
  journal={Computational biology and chemistry},
  volume={28},
  number={5-6},
  pages={367--374},
  year={2004}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return label_metric_info("matthews_correlation", _DESCRIPTION, _CITATION, _KWARGS_DESCRIPTION)

    def _compute(self, predictions, references, sample_weight=None):
        preds, refs = np.asarray(predictions), np.asarray(references)
        weight = sample_weights(sample_weight, len(refs))
        labels, index = np.unique(np.concatenate([refs, preds]), return_inverse=True)
        confusion = np.zeros((len(labels), len(labels)))
        np.add.at(confusion, (index[:len(refs)], index[len(refs):]), weight)
        true, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
        correct, total = np.trace(confusion), confusion.sum()
        cov_tp = correct * total - true @ predicted
        cov_pp = total ** 2 - predicted @ predicted
        cov_tt = total ** 2 - true @ true
        if cov_pp * cov_tt == 0:
            return {"matthews_correlation": 0.0}
        return {"matthews_correlation": float(cov_tp / np.sqrt(cov_tt * cov_pp))}
