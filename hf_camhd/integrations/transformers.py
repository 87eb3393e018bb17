"""CAM-HD in ``transformers.Trainer``: an optimizer factory, logging of the learned rates, and a truthful model card.

Three ways in (all resumable with ``trainer.train(resume_from_checkpoint=...)``; the README shows each, and a
test runs the README's lines):

* ``Trainer(optimizers=(CAMHDAdam(model, ...), None))`` — the Trainer adds its linear schedule, which CAM-HD
  reads as a multiplier on the learned rates (docs/algorithm.md §2); then ``CAMHDCallback.install(trainer)``;
* the factory path — the hierarchy is built from the Trainer's model, with the Trainer's weight-decay split::

      trainer = Trainer(model=model, args=args, train_dataset=ds,
                        optimizer_cls_and_kwargs=(CAMHDOptimizerFactory, {"optimizer": "adam-camhd", "lr": 1e-3,
                                                                          "levels": ("global", "block", "layer")}))
      CAMHDCallback.install(trainer)   # the learned rates -> log_history and every reporting integration

* :class:`CAMHDTrainer` — a ``Trainer`` that does both of the above by itself: the factory by default (``lr``
  and ``weight_decay`` from ``TrainingArguments`` unless given), the CAM-HD scalars in every training log
  (so they reach ``log_history``, the progress bar, TensorBoard, W&B, ...), and a model card that names
  the CAM-HD optimizer and its settings.

Logging: the Trainer appends a log to ``state.log_history`` *before* it calls the callbacks, and reporting
integrations (TensorBoard, W&B) are callbacks registered before the user's. :class:`CAMHDCallback` therefore
writes the scalars into the ``log_history`` entry itself and into ``logs`` (seen by every later callback);
``CAMHDCallback.install(trainer)`` puts it first, so the reporting integrations see them too.
:class:`CAMHDTrainer` adds them in ``Trainer.log`` and needs no callback.
"""

from __future__ import annotations

import inspect
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..files import atomic_write
from ..hierarchy import LRTree, build_hierarchy
from ..optim import CAMHDOptimizer
from ..optim.registry import create_optimizer, get_optimizer_info
from .._extras import require
from . import unwrap_camhd, unwrap_optimizer

require("hf_camhd.integrations.transformers", "transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402

__all__ = ["CAMHDCallback", "CAMHDOptimizerFactory", "CAMHDTrainer", "camhd_optimizer_description",
           "check_trainer_checkpoint", "decay_parameter_names", "fix_model_card", "latest_complete_checkpoint",
           "unwrap_camhd"]

DEFAULT_LEVELS = ("global", "block", "layer")


def decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the Trainer applies weight decay to (everything but biases and norms): the
    Trainer's own rule, ``Trainer.get_decay_parameter_names``."""
    return list(Trainer.get_decay_parameter_names(None, model))  # note: the method does not use `self`


class CAMHDOptimizerFactory:
    """Optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(CAMHDOptimizerFactory, kwargs))``.

    The Trainer calls ``CAMHDOptimizerFactory()(model, **kwargs)``. The factory builds the learning-rate tree
    from the model (:func:`hf_camhd.build_hierarchy`), splits the trainable parameters as the Trainer does
    (weight decay for weights, none for biases and norms) into named param groups, and creates the
    registered optimizer ``kwargs["optimizer"]`` (default ``"adam-camhd"``; see
    :func:`hf_camhd.list_optimizers`) over them.

    Keyword arguments: ``optimizer``, ``levels`` (default ``("global", "block", "layer")``), ``tree`` (an
    explicit :class:`~hf_camhd.LRTree`), ``weight_decay`` (applied to the decay group only; default: the
    optimizer's own default) and any
    argument of the optimizer class (``lr``, ``betas``, ``hypergrad_lr``, ``gamma_lr``, ``gamma``,
    ``decay_rate``, ...).

    note: on this path the Trainer does not pass ``TrainingArguments.learning_rate`` / ``weight_decay``;
    give ``lr`` and ``weight_decay`` in ``kwargs`` (or use :class:`CAMHDTrainer`, which fills them in).

        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=2, vocab_size=50,
        ...                                                  num_attention_heads=2, intermediate_size=32))
        >>> opt = CAMHDOptimizerFactory()(model, optimizer="adamw-camhd", lr=1e-3, weight_decay=0.01)
        >>> opt.tree.node_names("block"), [g["weight_decay"] for g in opt.param_groups]
        (['stem', 'bert.encoder.layer.0', 'bert.encoder.layer.1', 'head'], [0.01, 0.0])
    """

    def __call__(self, model: nn.Module, optimizer: str = "adam-camhd", levels: Sequence[str] | str | None = None,
                 tree: LRTree | None = None, weight_decay: float | None = None, **kwargs) -> CAMHDOptimizer:
        if not isinstance(model, nn.Module):
            raise TypeError(f"CAMHDOptimizerFactory needs the model (an nn.Module), got {type(model).__name__}; "
                            "pass it as optimizer_cls_and_kwargs=(CAMHDOptimizerFactory, kwargs) to the Trainer")
        info = get_optimizer_info(optimizer)
        accepted = inspect.signature(info.cls.__init__).parameters
        unknown = [k for k in kwargs if k not in accepted or k in ("self", "params")]
        if unknown:
            names = ["optimizer", "levels", "tree", "weight_decay",
                     *(k for k in accepted if k not in ("self", "params", "weight_decay", "levels", "tree"))]
            raise ValueError(f"Invalid CAMHDOptimizerFactory keyword {unknown[0]!r} for {info.name!r} "
                             f"({info.cls.__name__}); expected some of {', '.join(names)}")
        if tree is None:
            tree = build_hierarchy(model, info.fixed.get("levels", levels if levels is not None else DEFAULT_LEVELS))
        if weight_decay is None:  # the optimizer's default (AdamW: 1e-2), still kept off biases and norms
            weight_decay = info.defaults.get("weight_decay", accepted["weight_decay"].default)
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real):
            raise ValueError(f"Invalid weight_decay: {weight_decay!r}; expected a number >= 0 (it applies to the "
                             "weights; biases and norms get none)")
        wd = float(weight_decay)
        decay = set(decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [(n, p) for n, p in named if n in decay], "weight_decay": wd},
                  {"params": [(n, p) for n, p in named if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]] if wd else [{"params": named}]
        return create_optimizer(groups, info.name, tree=tree, weight_decay=wd, **kwargs)


def _training_log(logs: Mapping) -> bool:
    return "loss" in logs or "learning_rate" in logs


class CAMHDCallback(TrainerCallback):
    """Puts γ per level, mean / min / max α per level and the mean effective learning rate into the
    Trainer's training logs (keys ``camhd/gamma_<level>``, ``camhd/alpha_<level>_{mean,min,max}``,
    ``camhd/alpha_star_mean``, ``camhd/effective_lr_mean``).

    The values land in ``state.log_history`` and in the ``logs`` every later callback sees. Reporting
    integrations are registered before user callbacks; use ``CAMHDCallback.install(trainer)`` to put this
    callback first so that TensorBoard, W&B, ... get the scalars too (or use :class:`CAMHDTrainer`).
    Works with any Trainer optimizer path; does nothing when the optimizer is not a CAM-HD one.
    """

    @classmethod
    def install(cls, trainer: Trainer) -> CAMHDCallback:
        """Add a ``CAMHDCallback`` to ``trainer`` ahead of every other callback (reporting integrations included)."""
        cb = cls()
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or not _training_log(logs) or any(k.startswith("camhd/") for k in logs):
            return
        opt = unwrap_camhd(optimizer)
        if opt is None:
            return
        stats = opt.lr_stats()  # note: on every rank (it may gather sharded α under FSDP2)
        logs.update(stats)
        if state.log_history:
            last = state.log_history[-1]
            if last.get("step") == state.global_step and all(k in last for k in logs if k not in stats):
                last.update(stats)


class CAMHDTrainer(Trainer):
    """A ``transformers.Trainer`` for CAM-HD optimizers.

    * With neither ``optimizers`` nor ``optimizer_cls_and_kwargs``, it builds ``camhd_optimizer`` (default
      ``"adam-camhd"``) through :class:`CAMHDOptimizerFactory` with ``camhd_kwargs``; with the factory given
      explicitly it fills in ``lr`` / ``weight_decay`` from ``TrainingArguments`` when they are missing.
    * Every training log carries the CAM-HD scalars (see :class:`CAMHDCallback`), so ``log_history`` and
      every reporting integration get them.
    * ``create_model_card`` names the CAM-HD optimizer and its settings instead of ``args.optim``.
    * Resuming from the checkpoint of the last step trains nothing (the plain ``Trainer`` takes one more step).

    Example::

        trainer = CAMHDTrainer(model=model, args=args, train_dataset=ds,
                               camhd_optimizer="adam-camhd", camhd_kwargs={"levels": ("global", "block", "layer"),
                                                                           "hypergrad_lr": 1e-8, "gamma_lr": 0.01})
    """

    def __init__(self, *args, camhd_optimizer: str = "adam-camhd", camhd_kwargs: Mapping[str, Any] | None = None,
                 **kwargs):
        if kwargs.get("optimizer_cls_and_kwargs") is None and kwargs.get("optimizers", (None, None))[0] is None:
            kwargs["optimizer_cls_and_kwargs"] = (CAMHDOptimizerFactory,
                                                  {"optimizer": camhd_optimizer, **dict(camhd_kwargs or {})})
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        spec = self.optimizer_cls_and_kwargs
        if self.optimizer is None and spec is not None and spec[0] is CAMHDOptimizerFactory:
            kw = dict(spec[1])
            kw.setdefault("lr", self.args.learning_rate)
            kw.setdefault("weight_decay", self.args.weight_decay)
            if "adam" in str(kw.get("optimizer", "adam-camhd")):
                kw.setdefault("betas", (self.args.adam_beta1, self.args.adam_beta2))
                kw.setdefault("eps", self.args.adam_epsilon)
            self.optimizer_cls_and_kwargs = (CAMHDOptimizerFactory, kw)
        return super().create_optimizer(model)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # note: transformers' loop checks max_steps only after a step, so resuming from the checkpoint of the
        # last step would train one step too many (and save checkpoint-<max_steps + 1>); nothing is left to do
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        opt = unwrap_camhd(self.optimizer)
        if opt is not None and _training_log(logs):
            logs.update(opt.lr_stats())
        super().log(logs, *args, **kwargs)

    def create_model_card(self, *args, **kwargs) -> None:
        super().create_model_card(*args, **kwargs)
        opt = unwrap_camhd(self.optimizer)
        if opt is not None and self.is_world_process_zero():
            fix_model_card(os.path.join(self.args.output_dir, "README.md"), opt)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return str(v)


def camhd_optimizer_description(optimizer: Any) -> str:
    """One line describing a CAM-HD optimizer for a model card: class, levels, base settings, CAM-HD settings
    and the learned γ."""
    opt = unwrap_camhd(optimizer)
    if opt is None:
        inner = unwrap_optimizer(optimizer)
        raise ValueError(f"Invalid optimizer: {type(inner).__name__}"
                         + (f" (inside {type(optimizer).__name__})" if inner is not optimizer else "")
                         + " is not a CAM-HD optimizer, so there is no CAM-HD description or learned rates to write")
    cfg, g = opt.config, opt.param_groups[0]
    base = [f"{k}={_fmt(g[k])}" for k in ("betas", "eps", "momentum", "nesterov", "amsgrad") if k in g]
    decays = sorted({float(grp["weight_decay"]) for grp in opt.param_groups})
    base.append("weight_decay=" + "/".join(_fmt(d) for d in decays) + (" (no decay for biases and norms)"
                                                                        if len(decays) > 1 else ""))
    gamma = [round(x, 4) for x in opt.gamma.tolist()]
    return (f"{type(opt).__name__} (CAM-HD: combined adaptive multi-level hyper-gradient descent, hf_camhd) "
            f"with levels={','.join(opt.levels)}, lr (α₀)={_fmt(cfg.lr)}, {', '.join(base)}, "
            f"hypergrad_lr (β)={_fmt(cfg.hypergrad_lr)}, gamma_lr (δ)={_fmt(cfg.gamma_lr)}, "
            f"decay_rate={_fmt(cfg.decay_rate)}, hypergrad_scaling={cfg.hypergrad_scaling}, "
            f"gamma_update={cfg.gamma_update}; learned γ after {opt.num_steps} steps: {gamma}")


_RATES_HEADING = "### CAM-HD learned rates"
_OPT_LINE = re.compile(r"^- optimizer: .*?(?=^- |^#|\Z)", re.MULTILINE | re.DOTALL)


def fix_model_card(path: str | os.PathLike, optimizer: Any) -> str:
    """Rewrite the ``- optimizer:`` line of a Trainer-generated model card (which names ``args.optim``, e.g.
    AdamW) to describe the CAM-HD optimizer, add the ``camhd`` tag and a table of the learned γ / α per
    level. Returns the new card text."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    line = f"- optimizer: {camhd_optimizer_description(optimizer)}\n"
    if _OPT_LINE.search(text):
        text = _OPT_LINE.sub(lambda m: line, text, count=1)
    elif "### Training hyperparameters" in text:
        text = text.replace("### Training hyperparameters\n", "### Training hyperparameters\n\n" + line, 1)
    else:
        text = text.rstrip("\n") + "\n\n### Training hyperparameters\n\n" + line
    if text.startswith("---\n") and "\ntags:\n" in text.split("\n---\n", 1)[0] and "- camhd\n" not in text:
        text = text.replace("\ntags:\n", "\ntags:\n- camhd\n", 1)
    if _RATES_HEADING not in text:
        from ..hub import learned_rates_table
        text = (text.rstrip("\n") + f"\n\n{_RATES_HEADING}\n\nFinal combination weights γ and learned rates α per "
                f"level after {unwrap_camhd(optimizer).num_steps} optimizer steps:\n\n"
                + learned_rates_table(unwrap_camhd(optimizer)) + "\n")
    atomic_write(path, text)
    return text


# ------------------------------------------------------------------------------------------ checkpoints
#: Files every Trainer checkpoint has (the Trainer writes ``trainer_state.json`` last).
TRAINER_CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state*.pth")
_RESUME_FIX = ("Delete that folder (--resume_from_checkpoint latest then takes the one before it), or start over "
               "without --resume_from_checkpoint.")


def check_trainer_checkpoint(folder: str | os.PathLike) -> str:
    """``folder`` if it is a complete, undamaged ``Trainer`` checkpoint; else one
    :class:`~hf_camhd.files.CorruptFileError` naming the missing or damaged file and what to do (instead
    of a traceback from inside ``torch.load`` or ``json``)."""
    from ..files import check_files

    check_files(folder, required=TRAINER_CHECKPOINT_FILES, fix=_RESUME_FIX, what="Trainer checkpoint")
    return str(folder)


def latest_complete_checkpoint(output_dir: str | os.PathLike, *, log=print) -> str | None:
    """The newest ``checkpoint-<step>`` folder in ``output_dir`` whose save finished, or ``None``.

    The Trainer writes a checkpoint's files one by one and ``trainer_state.json`` last, so a folder without
    it is what a kill during the save left behind: it is deleted (the Trainer writes it again when training
    gets there) and ``log`` says so. Unlike ``transformers.trainer_utils.get_last_checkpoint``, which
    would hand such a folder to the Trainer.

    Example::

        resume = latest_complete_checkpoint(args.output_dir)          # None on the first start
        trainer.train(resume_from_checkpoint=resume and check_trainer_checkpoint(resume))
    """
    import shutil
    from pathlib import Path

    found = []
    folder = Path(output_dir)
    if folder.is_dir():
        for d in folder.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", d.name)
            if m and d.is_dir():
                found.append((int(m.group(1)), d))
    for _, d in sorted(found, reverse=True):
        if (d / "trainer_state.json").is_file():
            return str(d)
        shutil.rmtree(d, ignore_errors=True)
        if log is not None:
            log(f"note: removed {d}: it has no trainer_state.json (the run was killed while saving it)")
    return None

