"""Optional dependencies: which extra of ``hf_camhd`` installs which package, and the one error when one is missing.

``pip install hf_camhd`` installs torch only (the optimizers and the learning-rate trees). The rest is behind
extras (see ``pyproject.toml``):

* ``hf``: transformers, accelerate, datasets, timm, evaluate, huggingface_hub, safetensors — the integrations,
  ``hf_camhd.models``, ``hf_camhd.data``, ``hf_camhd.metrics``, ``hf_camhd.hub``;
* ``experiments``: ``hf`` plus matplotlib, scikit-learn, jinja2, tqdm, pillow — ``hf-camhd compare`` and the
  training scripts — and the learning-rate-free baselines (prodigyopt, schedulefree, dadaptation, dog-optimizer);
* ``all``: both; ``test``: ``all`` plus the test tools.

A module that needs an extra calls :func:`require` first, so importing it without the package gives one
``ImportError`` that names the extra to install:

    >>> from hf_camhd._extras import require
    >>> require("hf_camhd.example", "math")        # installed: returns the module
    <module 'math' ...>
    >>> require("hf_camhd.example", "surely_not_installed_pkg")
    Traceback (most recent call last):
    hf_camhd._extras.MissingDependencyError: hf_camhd.example needs surely_not_installed_pkg, which is not installed: pip install 'hf_camhd[all]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRA_OF", "MissingDependencyError", "require"]

#: Import name -> the extra that installs it.
EXTRA_OF = {
    "transformers": "hf", "accelerate": "hf", "datasets": "hf", "timm": "hf", "evaluate": "hf",
    "huggingface_hub": "hf", "safetensors": "hf", "jinja2": "hf",
    "matplotlib": "experiments", "sklearn": "experiments", "tqdm": "experiments", "PIL": "experiments",
    "prodigyopt": "experiments", "schedulefree": "experiments", "dadaptation": "experiments", "dog": "experiments",
}


class MissingDependencyError(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(feature: str, module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` for ``feature``; when it is not installed, raise one ``ImportError`` naming the extra.

    ``feature`` is what needs it, e.g. ``"hf_camhd.integrations.timm"``; ``extra`` overrides the extra named
    (default: the one that installs ``module``, :data:`EXTRA_OF`). The error, a :class:`MissingDependencyError`
    (an ``ImportError``), is raised ``from None`` (no chained traceback from inside the import system).
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        root = module.split(".")[0]
        if err.name is None or err.name.split(".")[0] != root:
            raise  # the package is there but something inside it is missing: not ours to rename
        extra = extra or EXTRA_OF.get(root, "all")
        raise MissingDependencyError(f"{feature} needs {root}, which is not installed: pip install "
                                     f"'hf_camhd[{extra}]'", name=root) from None
