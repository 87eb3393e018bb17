"""Evaluation metrics through 🤗 ``evaluate``, offline: ``accuracy``, ``f1`` and ``matthews_correlation``.

``evaluate.load("accuracy")`` fetches the module's script from the Hugging Face Hub, so it fails without
network. hf_camhd ships the three modules it reports as ``evaluate`` module folders inside the package
(``hf_camhd/metrics/<name>/<name>.py``, each an ``evaluate.Metric`` with the Hub module's name, inputs and
result) and loads them with ``evaluate.load(path)``. ``hf-camhd compare``, both training scripts and the
Trainer's ``compute_metrics`` compute their metrics with them, and results / model cards use the modules'
names (``accuracy``, ``f1``, ``matthews_correlation``).

    >>> from hf_camhd import metrics
    >>> accuracy = metrics.load("accuracy")
    >>> accuracy.add_batch(predictions=[1, 0], references=[1, 1])
    >>> accuracy.add_batch(predictions=[2], references=[2])
    >>> accuracy.compute()
    {'accuracy': 0.6666666666666666}
    >>> metrics.metric_path("f1").endswith("f1")
    True
"""

from __future__ import annotations

from pathlib import Path

from .._extras import require

evaluate = require("hf_camhd.metrics", "evaluate")

__all__ = ["METRICS", "SKLEARN_CITATION", "label_metric_info", "load", "metric_path", "sample_weights"]

#: The metric modules shipped with hf_camhd.
METRICS = ("accuracy", "f1", "matthews_correlation")


def metric_path(name: str) -> str:
    """The folder of the shipped ``evaluate`` module ``name`` (what ``evaluate.load`` takes)."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; hf_camhd ships {', '.join(METRICS)} (others: evaluate.load(name) "
                         "with network)")
    return str(Path(__file__).resolve().parent / name)


def load(name: str, **kwargs):
    """``evaluate.load`` of the shipped module ``name`` (no network). ``keep_in_memory=True`` by default, so
    batches added with ``add_batch`` never go to a cache file; other keyword arguments go to ``evaluate.load``."""
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)


# ------------------------------------------------------------------------------------------ for the modules
SKLEARN_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


def label_metric_info(name: str, description: str, citation: str, inputs_description: str):
    """The ``evaluate.MetricInfo`` of a shipped module: integer label ``predictions`` and ``references``, as the
    Hub module ``name`` declares them."""
    import datasets

    return evaluate.MetricInfo(
        description=description, citation=citation, inputs_description=inputs_description,
        features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
        reference_urls=[f"https://huggingface.co/spaces/evaluate-metric/{name}"])


def sample_weights(sample_weight, n: int):
    """``sample_weight`` as float64 numpy weights (all ones when ``None``)."""
    import numpy as np

    return np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
