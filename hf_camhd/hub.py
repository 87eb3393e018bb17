"""Publishing trained models to the Hugging Face Hub with a CAM-HD model card.

:func:`publish` writes a complete, Hub-ready folder — weights as safetensors, the model's config,
a model card (``README.md``) rendered from the Jinja templates in ``model_cards/`` through
``huggingface_hub.ModelCard.from_template``, plots, and ``camhd_config.json`` (optimizer settings,
learned γ / α and the learning-rate tree) — and, with ``push=True``, creates the repository and
uploads the folder in one commit.

It works for the models of :mod:`hf_camhd.models` (``PyTorchModelHubMixin`` format), timm models
(timm's own Hub format, so ``timm.create_model("hf-hub:<repo>", pretrained=True)`` loads them) and
transformers models (``save_pretrained``).

Example (``push=True, repo_id="me/lenet5-fmnist-camhd"`` would also upload the folder)::

    >>> import tempfile
    >>> from hf_camhd import CAMHDAdam
    >>> from hf_camhd.hub import publish
    >>> from hf_camhd.models import LeNet5
    >>> model = LeNet5()
    >>> opt = CAMHDAdam(model, lr=1e-3, levels=("global", "unit"), gamma=(0.8, 0.2))
    >>> folder = publish(model, tempfile.mkdtemp(), results={"accuracy": 0.905}, optimizer=opt,
    ...                  dataset="zalando-datasets/fashion_mnist")
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'camhd_config.json', 'config.json', 'model.safetensors']
    >>> "| levels | global, unit |" in (folder / "README.md").read_text()
    True
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._extras import require

require("hf_camhd.hub", "huggingface_hub")

from .files import atomic_path, atomic_write, scratch_dir  # noqa: E402

CARD_TEMPLATES = {"hf_camhd": "image_classifier.md", "timm": "timm.md", "transformers": "transformers.md"}

#: Display names as the paper writes them, keyed by (base rule name, nesterov).
_DISPLAY = {("sgd", False): "SGD-CAM-HD", ("sgd", True): "SGDN-CAM-HD", ("adam", False): "Adam-CAM-HD",
            ("adamw", False): "AdamW-CAM-HD"}


class HubUploadError(RuntimeError):
    """The upload could not happen (no token, no network, refused); the folder is left in place."""


#: Present in a folder while :func:`publish` moves its files in; a folder that still has it was left
#: half-written by a kill, and :func:`upload_folder` refuses it.
PUBLISHING_MARKER = ".camhd-publish-incomplete"


def check_repo_id(repo_id: Any, *, flag: str = "repo_id") -> str:
    """``repo_id`` if it is a valid Hub model id (``user/name``, ``org/name`` or ``name``), else ValueError
    naming ``flag``, the value and the rule."""
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"Invalid {flag}: {repo_id!r}; expected a Hub repository id such as 'user/name'")
    try:
        validate_repo_id(repo_id)
    except ValueError as err:  # HFValidationError
        raise ValueError(f"Invalid {flag}: {repo_id!r} is not a Hub repository id ({err}); expected 'user/name' "
                         "with letters, digits, '-', '_' and '.' only") from None
    return repo_id


def _check_results(results: Any) -> dict[str, float]:
    if not isinstance(results, Mapping) or not results:
        raise ValueError(f"Invalid results: {results!r}; publish needs the evaluation results for the card's "
                         "model-index, a mapping metric name -> number such as {'accuracy': 0.91}")
    out = {}
    for k, v in results.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"Invalid results: metric {k!r} is {v!r}; every result must be a finite number, "
                             "e.g. {'accuracy': 0.91}")
        out[str(k)] = float(v)
    return out


# ---------------------------------------------------------------------------------------- templates
def template_path(name: str) -> Path:
    """Path of a card template: packaged as ``hf_camhd.model_cards`` in wheels, ``model_cards/`` in a checkout."""
    try:
        import importlib.resources as resources
        candidate = resources.files("hf_camhd.model_cards").joinpath(name)
        if candidate.is_file():
            return Path(str(candidate))
    except ModuleNotFoundError:
        pass
    candidate = Path(__file__).resolve().parent.parent / "model_cards" / name
    if not candidate.is_file():
        raise FileNotFoundError(f"Model card template {name!r} not found (looked in hf_camhd.model_cards and {candidate.parent})")
    return candidate


# ---------------------------------------------------------------------------------------- summaries
def summarize_optimizer(optimizer: Any) -> dict:
    """Plain-data description of an optimizer for the card and ``camhd_config.json``.

    Wrappers are seen through (``accelerate``'s ``AcceleratedOptimizer``, i.e. ``trainer.optimizer``; see
    :func:`hf_camhd.integrations.unwrap_optimizer`). A CAM-HD optimizer gives its class, settings, final γ and the
    mean/min/max α per level (``"camhd": True``); any other ``torch.optim.Optimizer`` gives its class and
    hyper-parameters (``"camhd": False``: the card then says it is not a CAM-HD optimizer); a mapping is taken as
    already summarised (it must have ``name``).

        >>> import torch
        >>> from hf_camhd import CAMHDSGD
        >>> model = torch.nn.Linear(3, 2)
        >>> s = summarize_optimizer(CAMHDSGD(model, lr=0.1, levels=("global", "layer")))
        >>> s["class"], s["camhd"], s["levels"], [row["level"] for row in s["final"]]
        ('CAMHDSGD', True, ['global', 'layer'], ['global', 'layer'])
        >>> s = summarize_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
        >>> s["class"], s["camhd"], s["settings"]["lr"]
        ('AdamW', False, 0.001)
    """
    if isinstance(optimizer, Mapping):
        if "name" not in optimizer:
            raise ValueError("Invalid optimizer summary: a mapping needs at least a 'name' key")
        out = {"display_name": optimizer["name"], "base": "", "levels": [], "settings": {}, "final": []}
        out.update(optimizer)
        out.setdefault("camhd", bool(out["levels"]))
        return out
    from .integrations import unwrap_optimizer
    from .optim import CAMHDOptimizer

    wrapped = optimizer
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"Invalid optimizer: expected a torch.optim.Optimizer (or a wrapper of one, or a summary "
                         f"mapping), got {type(wrapped).__name__}")
    group = optimizer.param_groups[0]
    base_keys = ("lr", "betas", "eps", "weight_decay", "momentum", "nesterov", "dampening", "amsgrad")
    base = {k: _plain(group[k]) for k in base_keys if k in group}
    if not isinstance(optimizer, CAMHDOptimizer):
        name = type(optimizer).__name__
        if "initial_lr" in group:  # a scheduler ran: its multiplier is not the optimizer's setting
            base["lr"] = _plain(group["initial_lr"])
        return {"name": name, "display_name": name, "class": name, "camhd": False, "base": name.lower(),
                "levels": [], "settings": base, "final": []}
    cfg = optimizer.config
    rule = optimizer.rule.name
    nesterov = bool(group.get("nesterov", False))
    settings = {"lr (α₀)": cfg.lr, **{k: v for k, v in base.items() if k != "lr"},
                "hypergrad_lr (β)": cfg.hypergrad_lr, "gamma_lr (δ)": cfg.gamma_lr, "decay_rate (r)": cfg.decay_rate,
                "alpha_inf (α∞)": cfg.alpha_inf, "hypergrad_scaling": cfg.hypergrad_scaling,
                "gamma_update": cfg.gamma_update, "alpha bounds": [cfg.alpha_min, cfg.alpha_max]}
    stats = optimizer.lr_stats()
    final = [{"level": lv, "gamma": stats[f"camhd/gamma_{lv}"], "alpha_mean": stats[f"camhd/alpha_{lv}_mean"],
              "alpha_min": stats[f"camhd/alpha_{lv}_min"], "alpha_max": stats[f"camhd/alpha_{lv}_max"]}
             for lv in optimizer.levels]
    short = {"sgd": "sgdn" if nesterov else "sgd"}.get(rule, rule)
    return {"name": f"{short}-camhd", "display_name": _DISPLAY.get((rule, nesterov), f"{rule}-CAM-HD"),
            "class": type(optimizer).__name__, "camhd": True, "base": rule + (" (Nesterov)" if nesterov else ""),
            "levels": list(optimizer.levels), "settings": settings, "final": final, "steps": optimizer.num_steps,
            "tree": optimizer.tree.to_dict()}


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, tuple):
        return list(v)
    return v


def _dataset_info(dataset: str | Mapping) -> dict:
    if isinstance(dataset, str):
        return {"name": dataset.split("/")[-1], "id": dataset if "/" in dataset else None}
    if "name" not in dataset:
        raise ValueError("Invalid dataset: a mapping needs a 'name' key (and optionally 'id', 'split', 'config')")
    return {"id": None, **dict(dataset)}


def model_family(model: nn.Module) -> str:
    """``"hf_camhd"``, ``"timm"`` or ``"transformers"`` — which Hub format :func:`publish` writes."""
    from huggingface_hub import PyTorchModelHubMixin

    if type(model).__module__.startswith("hf_camhd.") and isinstance(model, PyTorchModelHubMixin):
        return "hf_camhd"
    try:
        from transformers import PreTrainedModel
        if isinstance(model, PreTrainedModel):
            return "transformers"
    except ImportError:
        pass
    if type(model).__module__.startswith("timm.") and hasattr(model, "pretrained_cfg"):
        return "timm"
    if isinstance(model, PyTorchModelHubMixin):
        return "hf_camhd"
    raise ValueError(f"Invalid model: {type(model).__name__} is not an hf_camhd model, a timm model or a transformers "
                     "model; publish() writes one of those three Hub formats")


# ---------------------------------------------------------------------------------------- publish
def publish(model: nn.Module, output_dir: str | Path, *, results: Mapping[str, float], optimizer: Any,
            dataset: str | Mapping, push: bool = False, repo_id: str | None = None, private: bool = False,
            token: str | None = None, plots: Mapping[str, str | Path] | None = None, model_name: str | None = None,
            description: str | None = None, license: str = "apache-2.0", task: str = "image-classification",
            commit_message: str | None = None) -> Path:
    """Write a Hub-ready folder for ``model`` (and upload it with ``push=True``).

    Args:
        model: an :mod:`hf_camhd.models` model, a timm model or a transformers model.
        output_dir: the folder to write (created; existing files of the same names are replaced).
        results: evaluation results, metric name → value (e.g. ``{"accuracy": 0.91}``); they go into
            the card's ``model-index`` and its results table.
        optimizer: the (trained) optimizer, or a mapping from :func:`summarize_optimizer`.
        dataset: a Hub dataset id (``"zalando-datasets/fashion_mnist"``), a name (``"digits"``), or a
            mapping with ``name`` and optionally ``id``, ``split``.
        push, repo_id, private, token: upload the folder to ``repo_id`` in one commit.
        plots: card title → PNG file; copied into the folder and shown in the card.
        model_name, description, license, task: card fields.

    Returns:
        The folder. Raises :class:`HubUploadError` (folder left in place) when the upload fails.

    Every file is written in a temporary folder first and then renamed into ``output_dir``; while the
    files move in, ``output_dir`` holds :data:`PUBLISHING_MARKER`, so a folder a kill left half-written
    is never uploaded (:func:`upload_folder` refuses it; publishing again completes it).
    """
    if push and not repo_id:
        raise ValueError("Invalid repo_id: push=True needs repo_id='user/name'")
    if repo_id is not None:
        check_repo_id(repo_id)
    family = model_family(model)
    results = _check_results(results)
    for title, src in (plots or {}).items():
        if not Path(src).is_file():
            raise ValueError(f"Invalid plots: {title!r} -> {str(src)!r} is not a file; pass existing PNG paths")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with scratch_dir(out) as staging:
        if family == "hf_camhd":
            model.save_pretrained(staging)
        elif family == "timm":
            from timm.models import save_for_hf
            save_for_hf(model, str(staging), safe_serialization=True)
        else:
            model.save_pretrained(staging, safe_serialization=True)
        write_card(model, staging, results=results, optimizer=optimizer, dataset=dataset, plots=plots,
                   model_name=model_name, description=description, license=license, task=task, repo_id=repo_id,
                   family=family)
        atomic_write(out / PUBLISHING_MARKER, "publish() is moving files into this folder\n")
        for entry in sorted(staging.iterdir()):
            target = out / entry.name
            if entry.is_dir() and target.is_dir():  # plots/: keep files of other names
                for f in sorted(entry.iterdir()):
                    os.replace(f, target / f.name)
            else:
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(entry, target)
        (out / PUBLISHING_MARKER).unlink()
    if push:
        summary = summarize_optimizer(optimizer)
        upload_folder(out, repo_id, private=private, token=token,
                      commit_message=commit_message or f"Upload model trained with {summary['display_name']}")
    return out


def write_card(model: nn.Module, output_dir: str | Path, *, results: Mapping[str, float], optimizer: Any,
               dataset: str | Mapping, plots: Mapping[str, str | Path] | None = None, model_name: str | None = None,
               description: str | None = None, license: str = "apache-2.0", task: str = "image-classification",
               repo_id: str | None = None, family: str | None = None) -> Path:
    """Write the model card (``README.md``), ``camhd_config.json`` and the plots into ``output_dir``
    (the weights are :func:`publish`'s job). Returns the card's path."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = family or model_family(model)
    summary = summarize_optimizer(optimizer)
    if not summary["camhd"] and not isinstance(optimizer, Mapping):
        warnings.warn(f"hf_camhd.hub: the optimizer is {summary['class']}, not a CAM-HD optimizer; the card says so "
                      "and has no learned rates", stacklevel=3)
    data = _dataset_info(dataset)
    plot_files = {}
    for title, src in (plots or {}).items():
        src = Path(src)
        with atomic_path(out / "plots" / src.name) as tmp:
            shutil.copyfile(src, tmp)
        plot_files[title] = f"plots/{src.name}"
    results = {k: float(v) for k, v in results.items()}
    config = {"optimizer": summary, "dataset": data, "results": results, "format": family}
    atomic_write(out / "camhd_config.json", json.dumps(config, indent=1, default=_plain))

    name = model_name or f"{type(model).__name__}-{data['name']}-{summary['name']}"
    dataset_id = data.get("id") or data["name"]
    eval_results = [EvalResult(task_type=task, dataset_type=dataset_id, dataset_name=data["name"],
                               dataset_split=data.get("split", "test"), metric_type=k, metric_value=v)
                    for k, v in results.items()]
    tags = ["camhd", "hyper-gradient-descent", "learned-learning-rate", task]
    if family != "hf_camhd":
        tags.append(family)
    card_data = ModelCardData(model_name=name, library_name=family, license=license, tags=tags,
                              datasets=[dataset_id], metrics=list(results), pipeline_tag=task,
                              eval_results=eval_results or None)
    training = _render_training(summary, data, results, plot_files, learned_rates_table(summary))
    kwargs = dict(model_name=name, training_section=training, repo_or_path=repo_id or str(out),
                  description=description or f"`{type(model).__name__}` trained on {data['name']} with "
                                             f"{summary['display_name']}.")
    if family == "hf_camhd":
        kwargs.update(model_class=type(model).__name__, input_shape=_input_shape(model))
    elif family == "transformers":
        kwargs.update(auto_class=_auto_class(model), has_tokenizer=(out / "tokenizer_config.json").exists())
    card = ModelCard.from_template(card_data, template_path=str(template_path(CARD_TEMPLATES[family])), **kwargs)
    with atomic_path(out / "README.md") as tmp:
        card.save(tmp)
    return out / "README.md"


def learned_rates_table(optimizer: Any) -> str:
    """The card's "learned rates" table (final γ and mean/min/max α per level) as markdown; ``optimizer``
    is an optimizer or a summary from :func:`summarize_optimizer`."""
    summary = summarize_optimizer(optimizer)
    if not summary["camhd"]:
        return f"None: {summary['display_name']} is not a CAM-HD optimizer, so it learns no rates."
    rows = ["| level | γ (final) | mean α | min α | max α |", "|---|---:|---:|---:|---:|"]
    rows += [f"| {r['level']} | {r['gamma']:.4f} | {r['alpha_mean']:.3e} | {r['alpha_min']:.3e} | {r['alpha_max']:.3e} |"
             for r in summary.get("final", [])]
    return "\n".join(rows)


def _render_training(summary: dict, data: dict, results: dict, plots: dict, learned_rates: str) -> str:
    import jinja2

    text = template_path("_training.md").read_text()
    return jinja2.Template(text).render(optimizer=summary, dataset=data, results=results, plots=plots,
                                        learned_rates=learned_rates, training_steps=summary.get("steps")).strip()


def _input_shape(model: nn.Module) -> list[int]:
    cfg = getattr(model, "config", None) or getattr(model, "_hub_mixin_config", None) or {}
    if isinstance(cfg, Mapping):
        if "in_channels" in cfg:
            return [cfg["in_channels"], cfg.get("image_size", 28), cfg.get("image_size", 28)]
        if "input_size" in cfg:
            return [cfg["input_size"]]
    return [1, 28, 28]


def _auto_class(model) -> str | None:
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    for suffix in ("ForSequenceClassification", "ForImageClassification", "ForCausalLM", "ForMaskedLM",
                   "ForTokenClassification", "ForQuestionAnswering"):
        if arch.endswith(suffix):
            return "AutoModel" + suffix
    return None


def training_plots(history: list[Mapping[str, float]], gamma_trajectory: list[Mapping[str, float]],
                   out_dir: str | Path) -> dict[str, Path]:
    """Plots of one training run for its card: test accuracy / loss per epoch (``history``: dicts with
    ``epoch``, ``accuracy``, ``loss``) and γ per level over optimizer steps (``gamma_trajectory``: dicts
    with ``step`` and one key per level). Returns card title → PNG path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    if history:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        epochs = [h["epoch"] for h in history]
        for ax, key in zip(axes, ("accuracy", "loss")):
            ax.plot(epochs, [h[key] for h in history], marker="o")
            ax.set(xlabel="epoch", ylabel=f"test {key}")
        fig.tight_layout()
        with atomic_path(out / "learning_curves.png") as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        plots["Learning curves"] = out / "learning_curves.png"
    levels = [k for k in (gamma_trajectory[0] if gamma_trajectory else {}) if k != "step"]
    if levels:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        steps = [g["step"] for g in gamma_trajectory]
        for lv in levels:
            ax.plot(steps, [g[lv] for g in gamma_trajectory], label=lv)
        ax.set(xlabel="optimizer step", ylabel="γ")
        ax.legend()
        fig.tight_layout()
        with atomic_path(out / "gamma.png") as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        plots["Combination weights γ"] = out / "gamma.png"
    return plots


def upload_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                  commit_message: str = "Upload model trained with CAM-HD") -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` in one commit; returns the commit URL.

    Raises :class:`HubUploadError` with the reason and the folder's path when there is no token,
    the Hub is unreachable (or ``HF_HUB_OFFLINE`` is set), or the Hub refuses.
    """
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    check_repo_id(repo_id)
    if (folder / PUBLISHING_MARKER).exists():
        raise HubUploadError(f"Folder {str(folder)!r} was left half-written by an interrupted publish() (it still has "
                             f"{PUBLISHING_MARKER}); nothing was uploaded. Run publish() again (or the command that "
                             "wrote the folder), then upload.")
    if not folder.is_dir():
        raise HubUploadError(f"Folder {str(folder)!r} does not exist; nothing was uploaded. Write it with publish() "
                             "first.")
    later = f"The Hub-ready folder is at {folder}; upload it later with `hf upload {repo_id} {folder}`."
    if constants.HF_HUB_OFFLINE:
        raise HubUploadError(f"HF_HUB_OFFLINE is set, so nothing was uploaded. {later}")
    if token is None and get_token() is None:
        raise HubUploadError(f"No Hugging Face token: log in with `hf auth login` or pass token=... . {later}")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=getattr(url, "repo_id", repo_id), folder_path=str(folder), repo_type="model",
                                   commit_message=commit_message)
    except Exception as err:  # network errors, HTTP errors, auth errors: one clear message
        raise HubUploadError(f"Upload to {repo_id!r} failed ({type(err).__name__}: {err}). {later}") from None
    return str(getattr(commit, "commit_url", commit))
